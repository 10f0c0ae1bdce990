"""Algorithms: each module is one method's update rule; all share the trainer in ctrldiff.train."""

from . import ctrl, ddpo, dpok, lasro, qlearning  # noqa: F401  (registers the algorithms)
from .base import ALGORITHMS, Algorithm, Minibatch, RolloutBatch, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "Minibatch", "RolloutBatch", "register_algorithm"]
