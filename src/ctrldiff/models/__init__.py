"""Built-in models and the one-call save/load for all of them."""

from .base import load_model, register_model, save_model
from .mlp import MLPScoreModel

__all__ = ["MLPScoreModel", "load_model", "register_model", "save_model"]
