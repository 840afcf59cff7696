"""`python -m htpo_jax.compile_check`: the command of `htpo_jax/tools/compile_check.py` (see its
docstring)."""

import sys

from htpo_jax.tools.compile_check import main

if __name__ == "__main__":
    sys.exit(main())
