"""Algorithms: each module is one method's update rule; all share the trainer in ctrldiff.train."""

from . import ctrl, ddpo, diffusion_dpo, dpok, lasro, qlearning, reward_backprop  # noqa: F401  (registers the algorithms)
from .base import ALGORITHMS, Algorithm, Minibatch, RolloutBatch, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "Minibatch", "RolloutBatch", "register_algorithm"]
