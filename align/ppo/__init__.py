"""Our own PPO for RLHF: pure losses, rollouts and the training loop."""
