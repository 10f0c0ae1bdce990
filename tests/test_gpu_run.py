"""A whole run on the GPU (marker ``gpu``): ``ctrldiff train --device cuda`` on the shipped digits model, then
``ctrldiff eval --device cuda`` of the run directory, which reproduces the run's final_eval.json.
(Without CUDA these skip; ``benchmarks/gpu_check.py --cpu`` runs them on the CPU.)"""

import json

import pytest
from click.testing import CliRunner

from ctrldiff.cli import main


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["ctrl", "ddpo"])
def test_train_and_eval_digits_on_the_device(gpu_device, tmp_path, algo):
    out = tmp_path / "run"
    batch, steps, n = (16, 10, 32) if gpu_device != "cpu" else (8, 4, 16)  # the CPU dry run: smaller
    r = CliRunner().invoke(main, [
        "train", "--algo", algo, "--model", "digits", "--reward", "digit-correct", "--epochs", "2", "--batch-size",
        str(batch), "--solver", "em", "--steps", str(steps), "--device", gpu_device, "--out", str(out), "--threads",
        "1", "--quiet", "--set", f"log.num_final_eval={n}", "--set", "log.tensorboard=false", "--set",
        "optim.minibatch=80", "--set", "log.num_eval_samples=10"]
        # the model must move: CTRL's acceptance test may undo both epochs of 8 trajectories of a saturated reward,
        # and two such epochs seldom certify a gain over the start (ctrl.certify_z)
        + (["--set", "ctrl.held_out=0", "--set", "ctrl.certify_z=0"] if algo == "ctrl" else []))
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in recs] == [0, 1] and all(rec["train/updates"] >= 1 for rec in recs)
    final = json.loads((out / "final_eval.json").read_text())
    for k in ("before", "after"):
        assert final[k]["n"] == n and 0 <= final[k]["reward_mean"] <= 1
    assert final["before"]["kl_path"] == 0.0 and final["after"]["kl_path"] > 0
    assert (out / "final_model.safetensors").exists() and (out / "samples" / "before_after.png").exists()
    r = CliRunner().invoke(main, ["eval", str(out), "--n", str(n), "--seed", "4321", "--device", gpu_device, "--json",
                                  "--threads", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    res = doc["results"][0]
    assert doc["kind"] == "digits" and res["label"] == f"em:{steps}" and 0 <= res["accuracy"] <= 1
    assert res["reward_mean"] == pytest.approx(final["after"]["reward_mean"], abs=1e-6)
    assert res["kl_path"] == pytest.approx(final["after"]["kl_path"], rel=1e-4, abs=1e-6)
