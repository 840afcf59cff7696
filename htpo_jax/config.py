"""`python -m htpo_jax.config`: the command of `htpo_jax/run/config.py` (see its docstring)."""

from htpo_jax.run.config import main

if __name__ == "__main__":
    main()
