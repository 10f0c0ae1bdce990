"""Rewards: batched callables ``reward(x, cond) -> [B]`` with ``name`` and ``differentiable``."""

from .base import FunctionReward, Reward, WeightedSum, available, call_reward, make_reward, register_reward

__all__ = ["FunctionReward", "Reward", "WeightedSum", "available", "call_reward", "make_reward", "register_reward"]
