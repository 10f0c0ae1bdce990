"""Built-in models and the one-call save/load for all of them."""

from .base import load_model, register_model, save_model
from .classifier import DigitClassifier  # noqa: F401  (registers "digit-classifier")
from .mlp import MLPScoreModel
from .unet import UNet  # noqa: F401  (registers "unet")

__all__ = ["DigitClassifier", "MLPScoreModel", "UNet", "load_model", "register_model", "save_model"]
