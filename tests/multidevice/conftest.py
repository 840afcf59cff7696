"""tests/multidevice: tests on 8 fake CPU devices, in this pytest process.

Run on their own (CI's third pytest command): `python -m pytest -q tests/multidevice`.
pytest imports this file before it imports a test module here, and before any test has touched
jax's backend: the device count set here is the one the backend starts with. jax fixes it for the
process at the first computation, which is why tests/conftest.py keeps this folder out of every
other invocation (and refuses a mix of it and other tests): the rest of the suite keeps one CPU
device. Only real multi-process runs (tests/test_multihost.py) still start subprocesses."""

import jax

N_DEVICES = 8

# Both raise if a backend is already up (the device count could no longer change): a loud error
# rather than tests that run on fewer devices than they claim.
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", N_DEVICES)
