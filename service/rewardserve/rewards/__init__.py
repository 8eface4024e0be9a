"""Reward-side computations shared by Best-of-N and PPO: ensemble objectives, rule
rewards (no model) and composite specifications."""
