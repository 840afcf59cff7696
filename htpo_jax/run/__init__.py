"""One training run: the loop, config, data, checkpoints, metrics and the run guards
(lock, resume checks, watch, preflight). Imports rl and everything below it.
"""
