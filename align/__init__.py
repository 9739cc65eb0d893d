"""align: LoRA SFT -> reward model -> DPO/PPO, each stage a versioned adapter named by the next."""

__version__ = "0.1.0"
