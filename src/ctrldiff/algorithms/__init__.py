"""Algorithms: each module is one method's update rule; all share the trainer in ctrldiff.train."""

from . import (  # noqa: F401  (registers the algorithms)
    adjoint_matching,
    ctrl,
    ddpo,
    diffusion_dpo,
    diffusion_nft,
    dpok,
    flow_grpo,
    lasro,
    qlearning,
    reward_backprop,
)
from .base import ALGORITHMS, Algorithm, Minibatch, RolloutBatch, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "Minibatch", "RolloutBatch", "register_algorithm"]
