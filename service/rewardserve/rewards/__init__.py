"""Reward arithmetic shared by serving, Best-of-N and PPO."""
