"""benchmarks/step_length_check.py: the change in J that each tested epoch's step made, measured by sampling beside the
held-out test's model of it, without changing the run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("step_length_check", ROOT / "benchmarks" / "step_length_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cfg():
    return TrainConfig(model="gmm2-exact", reward="toy2d-quadratic", beta=0.5, epochs=4, batch_size=64, algo="ctrl",
                       sampler=dict(solver="em", steps=10), log=dict(progress=False, tensorboard=False))


def test_measurements_leave_the_run_unchanged_and_pair_the_step_with_its_start(tmp_path):
    mod = _module()
    plain = Trainer(_cfg(), tmp_path / "plain")
    plain.train()
    log: list = []
    restore = mod.record(log, n=64)
    try:
        checked = Trainer(_cfg(), tmp_path / "checked")
        checked.train()
    finally:
        restore()
    for a, b in zip(plain.trainable_parameters, checked.trainable_parameters, strict=True):
        assert torch.equal(a, b)  # the same run: weights put back exactly, no draw from the run's generators
    assert [r["epoch"] for r in log] == list(range(4))
    for r in log:
        if r["s"] == 1.0:  # the kept step is the trust region's: the two measurements are the same samples
            assert r["meas_s"] == r["meas_1"] and r["meas_s_minus_1"] == 0.0
        if r["s"] == 0.0:  # undone: back exactly at the start
            assert r["meas_s"] == 0.0
        assert abs(r["pred_s"] - (r["s"] * r["L"] - r["s"] ** 2 * r["Q"])) < 1e-9
    summary = mod.summarise(log)
    assert sum(v["epochs"] for v in summary.values()) == 4
