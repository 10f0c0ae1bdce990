"""Mixed precision: the likelihood ratio is exactly 1 at theta_old under fp16 / bf16 autocast.

The rollout evaluates eps on whole rollout chunks at one time t_k, the update on minibatches of (sample, step)
pairs: other batches, other kernels, other rounding. Under autocast the two eps differ by ~1e-3 and the log-ratio
of a late DDIM/EM step amplifies that to O(1) against a PPO clip of 0.1. ``optim.recompute_log_prob_old`` (on
automatically in reduced precision) recomputes log p_old on the update's own forward passes.
CPU: bf16 autocast (torch supports it on the CPU). GPU (marker ``gpu``): fp32 / bf16 / fp16 autocast on CUDA, the
built-in MLP and a tiny SD 1.5-shaped diffusers pipeline with ``diffusers.dtype``.
"""

import pytest
import torch
from torch import nn

from ctrldiff.train.config import TrainConfig
from ctrldiff.train.task import build_task
from ctrldiff.train.trainer import Trainer, runs_reduced_precision

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast(nn.Module):
    """``model`` run under torch.autocast(device, dtype): what the diffusers backend does with diffusers.dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.inner, self.autocast_dtype = model, dtype
        self.prediction = getattr(model, "prediction", "eps")

    def forward(self, x, t, cond=None):
        if self.autocast_dtype is None:
            return self.inner(x, t, cond)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return self.inner(x, t, cond).float()


def _first_log_ratio(tr: Trainer) -> torch.Tensor:
    """log p_theta - log p_old on the first minibatch of one update (theta = theta_old there)."""
    seen = []
    loss = tr.algo.loss

    def spy(mb):
        seen.append((mb.log_prob - mb.log_prob_old).detach())
        return loss(mb)

    tr.algo.loss = spy
    batch = tr.collect()
    tr.algo.prepare(batch)
    tr.algo.update(batch)
    tr.algo.loss = loss
    return seen[0]


def _mlp_trainer(algo: str, device: str, dtype, recompute=None, steps: int = 10) -> Trainer:
    task = build_task("gmm2-exact", "vp", device)
    task.model, task.ref = Autocast(task.model, dtype), Autocast(task.ref, dtype)
    cfg = TrainConfig(algo=algo, model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=1, batch_size=32,
                      device=device, sampler=dict(solver="em", steps=steps),
                      optim=dict(lr=1e-3, minibatch=96, microbatch=32, inner_epochs=2,
                                 recompute_log_prob_old=recompute),
                      log=dict(progress=False, tensorboard=False))
    return Trainer(cfg, task=task)


@pytest.mark.parametrize("algo", ["ddpo", "dpok"])
def test_ratio_is_exactly_one_at_theta_old_under_bf16_autocast(algo):
    tr = _mlp_trainer(algo, "cpu", torch.bfloat16)
    assert tr.recompute_log_prob_old  # automatic: the policy autocasts
    lr = _first_log_ratio(tr)
    assert lr.numel() == 32 and bool((lr == 0).all()), float(lr.abs().max())


def test_recompute_is_off_in_fp32_and_the_ratio_is_one():
    tr = _mlp_trainer("ddpo", "cpu", None)
    assert not tr.recompute_log_prob_old and not runs_reduced_precision(tr.task.model)
    torch.testing.assert_close(_first_log_ratio(tr), torch.zeros(32), atol=1e-4, rtol=0)
    tr = _mlp_trainer("ddpo", "cpu", None, recompute=True)
    assert bool((_first_log_ratio(tr) == 0).all())


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny SD 1.5-shaped pipeline directory, built once for this module."""
    pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
    pytest.importorskip("peft", reason="the diffusers extra is not installed")
    from ctrldiff.models.diffusers_tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd15") / "sd15", "sd15")


def _sd_trainer(path, device: str, precision: str, recompute=None) -> Trainer:
    cfg = TrainConfig(algo="ddpo", model=str(path), reward="jpeg-compressibility", epochs=1, batch_size=4,
                      device=device, sampler=dict(solver="ddim", eta=1.0, steps=10),
                      optim=dict(lr=1e-4, minibatch=20, microbatch=10, recompute_log_prob_old=recompute),
                      log=dict(progress=False, tensorboard=False, kl_path=False),
                      diffusers=dict(prompts="simple-animals", lora_rank=2, dtype=precision))
    return Trainer(cfg)


def test_ratio_is_exactly_one_for_a_diffusers_unet_under_cpu_bf16(sd15):
    """The tiny SD 1.5-shaped UNet with diffusers.dtype=bf16 on the CPU: the rollout's log p_old differs from the
    update's forward passes (measured: |log ratio| up to 2.4e-4 at theta_old); recomputed, the ratio is exactly 1."""
    tr = _sd_trainer(sd15, "cpu", "bf16")
    assert tr.recompute_log_prob_old
    lr = _first_log_ratio(tr)
    assert lr.numel() == 10 and bool((lr == 0).all()), float(lr.abs().max())
    lr = _first_log_ratio(_sd_trainer(sd15, "cpu", "bf16", recompute=False))
    assert float(lr.abs().max()) > 1e-6  # the rollout's own log p_old: more than fp32 rounding apart


# ---- on a GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ratio_is_one_under_cuda_autocast(gpu_device, precision):
    dtype = HALF.get(precision)
    tr = _mlp_trainer("ddpo", gpu_device, dtype)
    assert tr.recompute_log_prob_old == (dtype is not None)
    lr = _first_log_ratio(tr)
    if dtype is None:  # fp32: the rollout's own log p_old, equal up to fp32 (and TF32) rounding
        assert float(lr.abs().max()) < 1e-3, float(lr.abs().max())
    else:  # recomputed: exactly 0 on the CPU; on CUDA allow 1e-6 (a kernel may not be bitwise reproducible)
        assert float(lr.abs().max()) <= (0.0 if gpu_device == "cpu" else 1e-6), float(lr.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ratio_is_one_for_a_diffusers_unet_under_cuda_autocast(gpu_device, sd15, precision):
    if gpu_device == "cpu" and precision == "fp16":
        pytest.skip("diffusers.dtype=fp16 needs CUDA (the CPU dry run of gpu_check.py)")
    tr = _sd_trainer(sd15, gpu_device, precision)
    assert tr.recompute_log_prob_old == (precision != "fp32")
    lr = _first_log_ratio(tr)
    if precision == "fp32":
        assert float(lr.abs().max()) < 1e-2, float(lr.abs().max())
    else:
        assert float(lr.abs().max()) <= (0.0 if gpu_device == "cpu" else 1e-6), float(lr.abs().max())
