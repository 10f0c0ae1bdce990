"""Per-condition reward statistics (as in DDPO's per-prompt stat tracking)."""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor


class PerConditionStats:
    """Running reward buffers per condition; standardises rewards within their condition.

    With fewer than ``min_count`` rewards buffered for a condition, the whole batch's statistics are
    used instead. ``cond=None`` (unconditional models) uses one global buffer. ``cond`` may be a Tensor
    of labels [B] (or condition vectors [B, ...]) or a list of B prompt strings (DDPO's per-prompt tracker).
    """

    def __init__(self, buffer_size: int = 64, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[object, deque] = {}

    @staticmethod
    def _keys(cond: Tensor | list[str] | None, n: int) -> list:
        if cond is None:
            return [None] * n
        if isinstance(cond, list | tuple):
            return [str(c) for c in cond]
        return [int(c) if c.ndim == 0 else tuple(c.flatten().tolist()) for c in cond.detach().cpu()]

    def update(self, rewards: Tensor, cond: Tensor | list[str] | None) -> None:
        for key, r in zip(self._keys(cond, len(rewards)), rewards.detach().cpu().tolist(), strict=True):
            self.buffers.setdefault(key, deque(maxlen=self.buffer_size)).append(r)

    def baseline(self, rewards: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """(mean, std) per sample from its condition's buffer (call ``update`` first) -> [B], [B]."""
        keys = self._keys(cond, len(rewards))
        g_mean, g_std = rewards.mean(), rewards.std(unbiased=False) if len(rewards) > 1 else rewards.new_tensor(1.0)
        means, stds = [], []
        for key in keys:
            buf = self.buffers.get(key, ())
            if len(buf) >= self.min_count:
                v = torch.tensor(list(buf))
                means.append(v.mean())
                stds.append(v.std(unbiased=False))
            else:
                means.append(g_mean.cpu())
                stds.append(g_std.cpu())
        return torch.stack(means).to(rewards), torch.stack(stds).to(rewards)

    def advantages(self, rewards: Tensor, cond: Tensor | None, normalize: bool = True) -> Tensor:
        """Update the buffers with ``rewards`` and return (r - mean_c) [/ (std_c + 1e-6)]  [B]."""
        self.update(rewards, cond)
        mean, std = self.baseline(rewards, cond)
        adv = rewards - mean
        return adv / (std + 1e-6) if normalize else adv

    def summary(self) -> dict[str, float]:
        out = {}
        for key, buf in sorted(self.buffers.items(), key=lambda kv: str(kv[0])):
            if key is not None and len(buf):
                out[f"reward_by_cond/{key}"] = sum(buf) / len(buf)
        return out

    def state_dict(self) -> dict:
        return {"buffers": {str(k): list(v) for k, v in self.buffers.items()},
                "keys": {str(k): k for k in self.buffers}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {state["keys"][s]: deque(v, maxlen=self.buffer_size) for s, v in state["buffers"].items()}
