"""rewardserve: reward-model scoring, Best-of-N and PPO jobs behind REST and gRPC."""

__version__ = "0.1.0"
