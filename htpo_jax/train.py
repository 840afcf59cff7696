"""`python -m htpo_jax.train`: the command of `htpo_jax/run/train.py` (see its docstring)."""

from htpo_jax.run.train import main

if __name__ == "__main__":
    main()
