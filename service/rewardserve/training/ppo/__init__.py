"""PPO trainer: the RLHF policy-optimisation loop, rewarded online by the service's own scorer."""
