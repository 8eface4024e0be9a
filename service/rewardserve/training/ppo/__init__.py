"""PPO (and the critic-free RLOO / GRPO) for the policies of the model repository, rewarded by
the service's own scorer."""
