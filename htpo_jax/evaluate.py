"""`python -m htpo_jax.evaluate`: the command of `htpo_jax/tools/evaluate.py` (see its
docstring)."""

from htpo_jax.tools.evaluate import main

if __name__ == "__main__":
    main()
