"""ctrldiff: fine-tune and train diffusion models with rewards by continuous-time RL."""

__version__ = "0.1.0"
