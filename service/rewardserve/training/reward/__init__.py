"""Bradley-Terry reward-model training on pairwise preference data."""
