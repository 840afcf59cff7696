"""Infrastructure below everything else: multi-host sync, the mesh and its logical-axis
rules, TPU topologies. Imports nothing else of htpo_jax.
"""
