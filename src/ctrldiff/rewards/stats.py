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

    ``gather`` (multi-process training: the trainer's ``dist.all_gather_any``) maps this process's rewards /
    conditions to every process's, so that the buffers and the whole-batch statistics are those of the global
    batch and every process computes the same baselines.
    """

    def __init__(self, buffer_size: int = 64, min_count: int = 16, gather=None):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[object, deque] = {}
        self.gather = gather

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

    def baseline(self, rewards: Tensor, cond: Tensor | None,
                 batch_rewards: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mean, std) per sample from its condition's buffer (call ``update`` first) -> [B], [B]; a condition
        with too few buffered rewards gets the mean / std of ``batch_rewards`` (default: ``rewards``)."""
        keys = self._keys(cond, len(rewards))
        br = rewards if batch_rewards is None else batch_rewards
        g_mean, g_std = br.mean(), br.std(unbiased=False) if len(br) > 1 else br.new_tensor(1.0)
        means, stds = [], []
        for key in keys:
            buf = self.buffers.get(key, ())
            if len(buf) >= self.min_count:
                v = torch.tensor(list(buf), device="cpu")
                means.append(v.mean())
                stds.append(v.std(unbiased=False))
            else:
                means.append(g_mean.cpu())
                stds.append(g_std.cpu())
        return torch.stack(means).to(rewards), torch.stack(stds).to(rewards)

    def advantages(self, rewards: Tensor, cond: Tensor | None, normalize: bool = True) -> Tensor:
        """Update the buffers with ``rewards`` (every process's, with ``gather``) and return
        (r - mean_c) [/ (std_c + 1e-6)] for this process's rewards  [B]."""
        if self.gather is None:
            all_r, all_c = rewards, cond
        else:
            all_r, all_c = self.gather(rewards), self.gather(cond)
        self.update(all_r, all_c)
        mean, std = self.baseline(rewards, cond, all_r)
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
