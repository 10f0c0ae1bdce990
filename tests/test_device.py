"""Device discipline without a GPU: every tensor of a run is created on the run's device or moved there on purpose.

The models live on the CPU while torch's default device is ``meta``: a tensor created without an explicit device
(``torch.randn(shape)``, ``torch.arange(n)``, ``torch.Generator()``-driven sampling, ...) lands on ``meta`` and
cannot mix with the run's CPU tensors (the op raises, or a ``.item()`` / ``.numpy()`` on it does). On a GPU the same
tensor would be a CPU tensor meeting CUDA ones: the crash this catches.
"""

import json

import pytest
import torch

from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def _log(**kw):
    return dict(progress=False, tensorboard=False, checkpoint_every=1, num_eval_samples=8, num_final_eval=8) | kw


CONFIGS = {
    "ctrl": dict(),
    "ddpo": dict(),
    "ddpo-sf": dict(),
    "dpok": dict(),
    "q-learning": dict(),
    "reward-backprop": dict(),
    "diffusion-dpo": dict(),
    "lasro": dict(model="digits-2step", reward="digit-correct", batch_size=16,
                  sampler=dict(solver="ddim", steps=2, eta=0.0),
                  lasro=dict(gen_batch=8, initial_surrogate_steps=4, surrogate_steps=2, pairs=16, gen_steps=2)),
}


def _cfg(algo: str, **kw) -> TrainConfig:
    base = dict(algo=algo, model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=2, batch_size=8,
                sampler=dict(solver="em", steps=4), optim=dict(lr=1e-3, minibatch=16, ema_decay=0.9), log=_log())
    return TrainConfig(**(base | CONFIGS[algo] | kw))


@pytest.mark.parametrize("algo", list(CONFIGS))
def test_training_creates_no_tensor_off_the_run_device(tmp_path, algo):
    """Rollouts, rewards, advantages, critics / surrogates / replay buffers, the policy update, EMA, samples,
    checkpoints, resume and the final evaluation (final_eval.json) all run with the default device ``meta``."""
    tr = Trainer(_cfg(algo), tmp_path / "run")
    with torch.device("meta"):
        tr.train(epochs=1)
    del tr
    tr = Trainer(_cfg(algo), tmp_path / "run", resume=True)
    assert tr.epoch == 1
    with torch.device("meta"):
        tr.train()
    res = json.loads((tmp_path / "run" / "final_eval.json").read_text())
    assert res["after"]["n"] == 8 and all(torch.isfinite(torch.tensor(res[k]["reward_mean"])) for k in ("before", "after"))


def test_final_eval_and_ctrldiff_eval_use_the_run_device(tmp_path):
    """``Trainer.final_eval`` and ``ctrldiff eval`` (evaluate_setup) build noise, time grid and conditions on the
    models' device (bug: evaluate_policy made them on the CPU and a --device cuda run crashed at its end)."""
    from ctrldiff.eval.evaluate import evaluate_policy
    from ctrldiff.eval.run_eval import evaluate_setup, parse_solvers
    from ctrldiff.eval.target import load_setup

    tr = Trainer(_cfg("ctrl", epochs=1, log=_log(num_final_eval=0)), tmp_path / "run")
    tr.train()
    kw = dict(sample_shape=tr.task.sample_shape, n=8, solver="em", steps=4, beta=0.5, seed=3, chunk=4)
    ref = evaluate_policy(tr.policy, tr.ref, tr.process, tr.reward, **kw)
    with torch.device("meta"):
        tr.cfg.log.num_final_eval = 8
        got = tr.final_eval()["after"]
        mine = evaluate_policy(tr.policy, tr.ref, tr.process, tr.reward, device="cpu", **kw)
    assert got["n"] == 8 and mine == ref  # the same numbers as with the default device cpu
    setup = load_setup(str(tmp_path / "run"))
    want = evaluate_setup(setup, parse_solvers("em:4"), n=8)
    with torch.device("meta"):
        doc = evaluate_setup(setup, parse_solvers("em:4"), n=8, device="cpu")
    assert doc == want


@pytest.mark.parametrize("algo", ["ddpo", "dpok", "ctrl"])
def test_diffusers_training_creates_no_tensor_off_the_run_device(tmp_path, algo):
    """The same for a tiny SD 1.5-shaped pipeline: LoRA UNet with CFG, prompt embeddings, VAE decoding, the JPEG
    reward (CTRL: its surrogate critic and trust region), EMA, checkpoints and the final evaluation."""
    pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
    pytest.importorskip("peft", reason="the diffusers extra is not installed")
    from ctrldiff.models.diffusers_tiny import save_tiny_pipeline

    path = save_tiny_pipeline(tmp_path / "sd15", "sd15")
    cfg = TrainConfig(algo=algo, model=str(path), reward="jpeg-compressibility", epochs=1, batch_size=4,
                      sampler=dict(solver="ddim", eta=1.0, steps=3, guidance=2.0),
                      optim=dict(lr=1e-4, minibatch=6, microbatch=3, ema_decay=0.9),
                      log=_log(num_final_eval=2, num_eval_samples=2),
                      diffusers=dict(prompts="simple-animals", lora_rank=2))
    tr = Trainer(cfg, tmp_path / "run")
    with torch.device("meta"):
        tr.train()
    assert json.loads((tmp_path / "run" / "final_eval.json").read_text())["after"]["n"] == 2
