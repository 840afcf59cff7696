"""`python -m htpo_jax.export`: the command of `htpo_jax/tools/export.py` (see its docstring)."""

from htpo_jax.tools.export import main

if __name__ == "__main__":
    main()
