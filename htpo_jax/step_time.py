"""`python -m htpo_jax.step_time`: the command of `htpo_jax/tools/step_time.py` (see its
docstring)."""

import sys

from htpo_jax.tools.step_time import main

if __name__ == "__main__":
    sys.exit(main())
