"""The RL algorithm: the HTPO and baseline losses, advantages, packing, the jitted update,
the rollout-and-score stage and validation. Imports models, rollout, rewards and infra.
"""
