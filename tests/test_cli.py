"""The ctrldiff command line: --help, sampling, and one-line errors with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ctrldiff.cli import main
from ctrldiff.models import save_model
from ctrldiff.models.unet import UNet

COMMANDS = ["pretrain", "train-classifier", "sample", "verify-assets"]



@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    m = UNet(channels=(8, 16), emb_dim=32, groups=4)
    path = tmp_path_factory.mktemp("m") / "tiny"
    save_model(m, path, metadata={"process": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0}})
    return path.with_suffix(".safetensors")


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("cmd", [[], *[[c] for c in COMMANDS]])
def test_help(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0 and "Usage:" in r.output


@pytest.mark.parametrize("solver", ["em", "ddim", "ode-euler", "heun", "dpmpp-2m"])
def test_sample_writes_grid_and_tensors(tmp_path, tiny_model, solver):
    r = run("sample", "--model", str(tiny_model), "--solver", solver, "--steps", "3", "--n", "12", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "samples.png").exists() and str(tmp_path / "samples.png") in r.output
    t = load_file(str(tmp_path / "samples.safetensors"))
    assert t["samples"].shape == (12, 1, 8, 8) and t["labels"].tolist() == [i % 10 for i in range(12)]


def test_sample_one_label_pt_and_seeded(tmp_path, tiny_model):
    args = ["sample", "--model", str(tiny_model), "--solver", "ddim", "--eta", "1", "--steps", "3", "--n", "4",
            "--label", "7", "--format", "pt", "--guidance", "3"]
    assert run(*args, "--out", str(tmp_path / "a")).exit_code == 0
    assert run(*args, "--out", str(tmp_path / "b")).exit_code == 0
    a, b = torch.load(tmp_path / "a" / "samples.pt"), torch.load(tmp_path / "b" / "samples.pt")
    assert a["labels"].tolist() == [7] * 4 and torch.equal(a["samples"], b["samples"])


def test_sample_default_shipped_model(tmp_path):
    r = run("sample", "--steps", "2", "--n", "3", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert load_file(str(tmp_path / "samples.safetensors"))["samples"].shape == (3, 1, 8, 8)


def test_sample_2d_model_scatter(tmp_path):
    out = tmp_path / "p"
    assert run("pretrain", "gmm2", "--steps", "3", "--out", str(out), "--log-every", "1").exit_code == 0
    r = run("sample", "--model", str(out / "model.safetensors"), "--steps", "3", "--n", "50", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert load_file(str(tmp_path / "samples.safetensors"))["samples"].shape == (50, 2)
    assert run("sample", "--model", str(out / "model.json"), "--label", "3", "--out", str(tmp_path)).exit_code == 1


@pytest.mark.parametrize("args,msg", [
    (["sample", "--solver", "rk4"], "unknown solver 'rk4'"),
    (["sample", "--model", "/nonexistent/m.safetensors"], "model file not found"),
    (["sample", "--steps", "0"], "--steps must be >= 1"),
    (["sample", "--n", "-1"], "--n must be >= 1"),
    (["sample", "--label", "12"], "--label must lie in 0..9"),
    (["sample", "--label", "seven"], "--label must be an integer"),
    (["sample", "--solver", "em", "--eta", "0.5"], "--eta applies to the ddim and eta solvers only"),
    (["sample", "--steps", "many"], "'many' is not a valid integer"),
    (["pretrain", "mnist"], "'mnist' is not one of"),
    (["pretrain", "gmm2", "--lr", "-1"], "invalid lr"),
    (["pretrain", "gmm2", "--process", "ve"], "unknown noise process"),
    (["train-classifier", "--epochs", "0"], "invalid epochs"),
    (["frobnicate"], "No such command"),
])
def test_bad_input_is_one_line_error(args, msg, tmp_path):
    r = run(*args, "--out", str(tmp_path)) if args[0] != "frobnicate" else run(*args)
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.output
    assert "Traceback" not in r.output


def test_console_script_error_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "ctrldiff.cli", "sample", "--solver", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: unknown solver")


def test_verify_assets_command():
    r = run("verify-assets")
    assert r.exit_code == 0 and "digits_unet.safetensors" in r.output and "digit_classifier.json" in r.output


def test_train_says_when_a_run_ends_with_its_start(tmp_path):
    """ctrl.certify_z: a run whose gain over the start is not certified says so in one line, and that its trained
    weights are kept (here an unreachable z makes sure it is not certified)."""
    r = run("train", "--model", "gmm2-exact", "--reward", "toy2d-mode-switch", "--epochs", "1", "--batch-size", "16",
            "--steps", "4", "--out", str(tmp_path / "run"), "--quiet", "--set", "ctrl.certify_z=1000",
            "--set", "log.tensorboard=false", "--set", "log.num_final_eval=16")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "not certified" in x)
    assert "the run ends with the start's weights" in line and "uncertified_params" in line, line
