"""Reward-side computations shared by Best-of-N and PPO (ensemble objectives)."""
