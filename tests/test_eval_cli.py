"""``ctrldiff eval``: JSON output on a tiny 2-D run, the shipped digits model and a digits run; one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from ctrldiff.cli import main
from ctrldiff.config import dump_yaml
from ctrldiff.eval.run_eval import parse_solvers
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory):
    """A tiny gmm2-exact run: 2 epochs x 32 trajectories x 8 EM steps (checkpoints only: no final_model)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("runs") / "ctrl-gmm2"
    cfg = TrainConfig(algo="ctrl", model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=2, batch_size=32,
                      sampler=dict(solver="em", steps=8), optim=dict(lr=1e-3, minibatch=64),
                      log=dict(progress=False, tensorboard=False, num_eval_samples=32))
    Trainer(cfg, out).train()
    return out


def test_eval_json_tiny_2d_run(run_2d):
    r = run("eval", run_2d, "--solvers", "em:8,ddim:8,heun:4", "--n", 128, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # stdout holds exactly one JSON document
    assert doc["kind"] == "exact-2d" and doc["beta"] == 0.5 and doc["reference"] == "gmm2-exact"
    assert doc["weights"].endswith(".pt")  # '*-exact' models are not saveable: the latest checkpoint is used
    assert [x["label"] for x in doc["results"]] == ["em:8", "ddim:8 (eta 0)", "heun:4"]
    j_star = doc["exact"]["J_star"]
    for x in doc["results"]:
        assert x["n"] == 128 and x["kl_path"] >= 0
        assert math.isclose(x["objective"], x["reward_mean"] - 0.5 * x["kl_path"], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(x["optimality_gap"], (j_star - x["objective"]) / abs(j_star), rel_tol=1e-9)
        assert x["objective"] <= j_star + 0.5  # J* is the optimum (up to Monte Carlo error)
        assert x["mmd"] is not None and x["mmd_baseline"] is not None


def test_eval_text_uses_the_runs_sampler(run_2d):
    r = run("eval", run_2d, "--n", 64)
    assert r.exit_code == 0, r.output
    assert "em:8" in r.output and "KL_path" in r.output and "J*" in r.output


def test_eval_json_shipped_digits():
    r = run("eval", "digits", "--n", 20, "--solvers", "ddim:5", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "digits" and doc["reward"] == "digit-confidence"
    (x,) = doc["results"]
    assert x["kl_path"] == 0.0  # the reference is the model itself
    assert 0 <= x["accuracy"] <= 1 and x["frechet"] >= 0 and x["diversity"] > 0
    assert sorted(x["diversity_per_class"], key=int) == [str(c) for c in range(10)]
    b = doc["real_baseline"]
    assert b["n_train"] == 20 and b["n_heldout"] == 300 and b["frechet_train_vs_heldout"] > 0
    assert b["accuracy_heldout"] > 0.9


def test_eval_digits_run_uses_final_model_and_reference(tmp_path):
    """A run directory whose final_model differs from the shipped model: KL_path > 0 against it."""
    from ctrldiff.assets import load_digits_model
    from ctrldiff.models.base import save_model

    out = tmp_path / "digits-run"
    out.mkdir()
    dump_yaml(TrainConfig(model="digits", beta=0.1, epochs=1), out / "config.yaml")
    m = load_digits_model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(m, out / "final_model", metadata={**m.metadata, "epochs": 1})
    r = run("eval", out, "--n", 10, "--steps", 4, "--solver", "ddim", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["weights"].endswith("final_model.safetensors") and doc["reference"] == "digits" and doc["beta"] == 0.1
    assert doc["results"][0]["kl_path"] > 0


@pytest.mark.parametrize("args, msg", [
    (["eval", "no/such/model"], "neither 'digits'"),
    (["eval", "digits", "--solver", "rk4"], "unknown solver 'rk4'"),
    (["eval", "digits", "--solvers", "em:x"], "bad step count"),
    (["eval", "digits", "--solvers", "em:5", "--steps", "5"], "either --solvers"),
    (["eval", "digits", "--guidance", "lots"], "--guidance"),
    (["eval", "digits", "--n", "1"], "--n must be >= 2"),
])
def test_eval_errors_are_one_line(args, msg, tmp_path):
    r = run(*args)
    assert r.exit_code == 1
    assert msg in r.output and r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1


def test_eval_rejects_a_non_run_directory(tmp_path):
    r = run("eval", tmp_path)
    assert r.exit_code == 1 and "not a ctrldiff run" in r.output


def test_parse_solvers():
    specs = parse_solvers("em:10, heun:25,ddim", default_steps=7)
    assert [(s.name, s.steps) for s in specs] == [("em", 10), ("heun", 25), ("ddim", 7)]
