"""Test-only helper for the diffusers backends (tests/test_diffusers_backend.py, tests/test_diffusers_flow.py; no
``test_`` prefix: pytest does not collect this file)."""

from __future__ import annotations

import torch


def pipeline_weights(task) -> dict[str, torch.Tensor]:
    """A copy of every parameter of the task's diffusers pipeline ('<component>.<name>': the denoiser, the VAE and the
    text encoders, whichever the pipeline has)."""
    mods = {k: m for k, m in task.backend.pipe.components.items() if isinstance(m, torch.nn.Module)}
    return {f"{k}.{n}": w.detach().clone() for k, mod in mods.items() for n, w in mod.named_parameters()}


def one_step(tr) -> tuple[dict, dict[str, torch.Tensor], set[str]]:
    """One training epoch of ``tr``: (its record, the pipeline's weights before it, the names of those it changed)."""
    before = pipeline_weights(tr.task)
    rec = tr.step()
    after = pipeline_weights(tr.task)
    return rec, before, {k for k in before if not torch.equal(before[k], after[k])}
