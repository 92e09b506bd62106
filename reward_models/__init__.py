"""heedful reward_models."""
