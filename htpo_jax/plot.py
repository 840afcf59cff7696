"""`python -m htpo_jax.plot`: the command of `htpo_jax/tools/plot.py` (see its docstring)."""

from htpo_jax.tools.plot import main

if __name__ == "__main__":
    main()
