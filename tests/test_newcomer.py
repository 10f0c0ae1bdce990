"""The first hour of a new user (issue 17): thread default, the before/after picture, own rewards from the working
directory, Ctrl-C and resume, no empty run directories, trackers, the end summary, friendlier errors,
``ctrldiff config`` / ``export`` and the example configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from ctrldiff.cli import default_threads, main
from ctrldiff.train.config import ALGOS, TrainConfig
from ctrldiff.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--batch-size", "16", "--steps", "4", "--threads", "1", "--quiet",
        "--set", "log.num_eval_samples=16", "--set", "log.num_final_eval=16", "--set", "log.checkpoint_every=1",
        "--set", "ctrl.value.epochs=1", "--set", "log.trackers=[]"]
GMM = ["train", "--model", "gmm2-exact", "--reward", "toy2d-mode-switch", "--beta", "0.5", *TINY]


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny CTRL run on the shipped digits model (1 epoch x 10 samples x 4 steps)."""
    out = tmp_path_factory.mktemp("d") / "run"
    r = run("train", "--epochs", "1", "--batch-size", "10", "--steps", "4", "--threads", "1", "--quiet", "--out", out,
            "--set", "log.num_eval_samples=40", "--set", "log.num_final_eval=10", "--set", "ctrl.value.epochs=1",
            "--set", "log.trackers=[tensorboard]")
    assert r.exit_code == 0, r.output
    return out, r.output


# ---- 1. threads -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cores,busy,want", [(2, 0.0, 2), (2, 0.2, 2), (2, 1.0, 1), (2, 1.9, 1), (2, 7.0, 1),
                                             (16, 0.0, 4), (8, 3.0, 4), (4, 2.6, 1), (1, 0.0, 1)])
def test_default_threads_use_the_idle_cores(cores, busy, want):
    assert default_threads(cores, busy) == want


def test_busy_cores_is_measured_and_threads_respect_omp_num_threads(monkeypatch):
    from ctrldiff import cli

    assert cli._busy_cores(0.05) >= 0.0
    before = torch.get_num_threads()
    cli._threads(None)
    assert torch.get_num_threads() == before  # torch was loaded before the CLI (as here): its setting is kept
    monkeypatch.setattr(cli, "AUTO_THREADS", True)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        cli._threads(None)
        assert torch.get_num_threads() == 2  # OMP_NUM_THREADS given: left alone
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cli, "_busy_cores", lambda: 1.0)
        cli._threads(None)
        assert torch.get_num_threads() == max(1, min(4, int(len(__import__("os").sched_getaffinity(0)) - 0.5)))
    finally:
        torch.set_num_threads(before)
    assert "--threads" in (ROOT / "README.md").read_text()


# ---- 2. the before/after picture ------------------------------------------------------------------------
def test_before_after_figure_labels_columns_and_rewards(tmp_path):
    from PIL import Image

    from ctrldiff.viz import before_after_figure

    g = torch.Generator().manual_seed(0)
    before, after = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1, torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    rb = torch.arange(12.0)
    ra = rb + torch.tensor([1.0, -1.0, 0.0] * 4)
    conds = ["cat", "dog", "a very long prompt that goes on and on"] * 4
    p = before_after_figure(before, after, rb, ra, tmp_path / "ba.png", conditions=conds, reward_name="my-reward",
                            after_label="after 3 epochs of ctrl", per_column=3)
    w, h = Image.open(p).size
    assert w >= 450 and h >= 700  # 3 columns x (3 + 3) rows of ~1.25 inch cells at 100 dpi
    doc = json.loads((tmp_path / "ba.json").read_text())
    assert [c["condition"] for c in doc["columns"]] == ["cat", "dog", "a very long prompt that goes on and on"]
    assert [len(c["samples"]) for c in doc["columns"]] == [3, 3, 3]
    assert doc["higher_after"] == 4 and doc["n"] == 12 and doc["reward"] == "my-reward"
    assert doc["columns"][0]["mean_after"] == pytest.approx(doc["columns"][0]["mean_before"] + 1)
    # 2-D data: two scatter panels coloured by reward
    before_after_figure(torch.randn(50, 2), torch.randn(50, 2), torch.randn(50), torch.randn(50), tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size[0] > 600 and json.loads((tmp_path / "s.json").read_text())["n"] == 50


def test_run_writes_the_labelled_picture_and_report_shows_it(digits_run, tmp_path):
    out, _ = digits_run
    doc = json.loads((out / "samples" / "before_after.json").read_text())
    assert [c["condition"] for c in doc["columns"]] == [str(k) for k in range(10)]
    assert all(len(c["samples"]) == 4 for c in doc["columns"]) and doc["reward"] == "digit-confidence"
    assert all(v is not None for v in doc["reward_before"] + doc["reward_after"])
    r = run("report", out, "--out", tmp_path / "r.html", "--no-robustness")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert "reward before" in page and "reward after" in page and f"of {doc['n']}</b>" in page
    assert "same noise" in page.lower()


# ---- 3. --reward mymod:fn from the working directory ----------------------------------------------------
def test_own_reward_module_imports_from_the_working_directory(tmp_path):
    work, bindir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bindir.mkdir()
    (work / "mymod.py").write_text("def far(x, cond):\n    return x.norm(dim=1)\n")
    # like the `ctrldiff` console script: sys.path[0] is the script's own directory, not the working directory
    (bindir / "ctrldiff_script.py").write_text("import sys\nfrom ctrldiff.cli import main\nsys.exit(main())\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(bindir / "ctrldiff_script.py"), "eval", "gmm2-exact", "--reward",
                        "mymod:far", "--n", "8", "--steps", "2", "--json"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["reward"] == "mymod:far"


# ---- 4. Ctrl-C names the checkpoint and the resume command; a finished run is not rerun ------------------
def test_ctrl_c_prints_the_resume_command_and_a_finished_run_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = Trainer.step

    def step(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", step)
    r = run(*GMM, "--out", out)
    assert r.exit_code == 130, r.output
    assert "error: aborted" not in r.output
    assert f"interrupted at epoch 1 of 2; last checkpoint: {out / 'checkpoints' / 'epoch_00001.pt'} (epoch 1)" in r.output
    cmd = r.output.strip().splitlines()[-1]
    assert cmd == f"continue with: ctrldiff train --resume {out} --threads 1"
    monkeypatch.setattr(Trainer, "step", real_step)
    r = run(*cmd.split()[3:])
    assert r.exit_code == 0, r.output
    assert (out / "final_eval.json").exists()
    stamp = (out / "final_eval.json").stat().st_mtime_ns
    r = run("train", "--resume", out, "--threads", "1")
    assert r.exit_code == 0, r.output
    assert f"run {out} is complete (2 of 2 epochs); nothing to do" in r.output
    assert (out / "final_eval.json").stat().st_mtime_ns == stamp  # the final evaluation did not run again


def test_ctrl_c_in_the_first_epoch_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "step", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    r = run(*GMM, "--out", tmp_path / "run")
    assert r.exit_code == 130 and "nothing to resume" in r.output and not (tmp_path / "run").exists()


# ---- 5. a failed launch leaves no run directory; report skips what is not a run ---------------------------
def test_failed_launch_leaves_no_directory_and_report_skips_non_runs(tmp_path, digits_run):
    r = run(*GMM, "--reward", "no-such-reward", "--out", tmp_path / "runs" / "bad")
    assert r.exit_code == 1 and not (tmp_path / "runs" / "bad").exists()
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    (tmp_path / "runs" / "started").mkdir()
    (tmp_path / "runs" / "started" / "config.yaml").write_text("algo: ctrl\n")
    r = run("report", digits_run[0], *(tmp_path / "runs").iterdir(), "--out", tmp_path / "r.html", "--no-robustness")
    assert r.exit_code == 0, r.output
    assert "skipping" in r.output and "not a ctrldiff run directory" in r.output and "no finished epoch" in r.output
    r = run("report", tmp_path / "runs" / "empty", "--out", tmp_path / "r2.html")
    assert r.exit_code == 1 and "nothing to report" in r.output


def test_pretrain_with_a_bad_config_creates_no_directory(tmp_path):
    from ctrldiff.errors import CtrlDiffError
    from ctrldiff.train.pretrain import PretrainConfig, pretrain

    with pytest.raises(CtrlDiffError):
        pretrain(PretrainConfig(dataset="gmm2", steps=1, model={"widthh": 3}, out=str(tmp_path / "p")), log=None)
    assert not (tmp_path / "p").exists()


# ---- 6 / 9. trackers ------------------------------------------------------------------------------------
def _tiny_gmm(out, **log):
    cfg = TrainConfig(model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=1, batch_size=16,
                      sampler=dict(steps=4), ctrl=dict(value=dict(epochs=1)),
                      log=dict(progress=False, num_eval_samples=16, num_final_eval=8, **log))
    Trainer(cfg, out).train()


def test_tensorboard_logs_scalars_and_images(digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(digits_run[0] / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"samples", "before_after"} <= set(acc.Tags()["images"])
    assert "reward_mean" in acc.Tags()["scalars"]


def test_missing_tracker_package_is_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level("WARNING", logger="ctrldiff"):
        _tiny_gmm(tmp_path / "run")
    msgs = [r.getMessage() for r in caplog.records if "logging is off" in r.getMessage()]
    assert len(msgs) == 1 and "tensorboard logging is off" in msgs[0] and "pip install tensorboard" in msgs[0]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_old_tensorboard_switch_still_works():
    assert TrainConfig(log=dict(tensorboard=False)).log.active_trackers() == []
    assert TrainConfig(log=dict(trackers=["wandb", "tensorboard", "wandb"])).log.active_trackers() == ["wandb",
                                                                                                      "tensorboard"]
    with pytest.raises(Exception, match="trackers"):
        TrainConfig(log=dict(trackers=["mlflow"]))


def test_wandb_offline_gets_metrics_and_sample_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _tiny_gmm(out, trackers=["wandb"])
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    images = [p.name for p in (runs[0] / "files" / "media" / "images").rglob("*.png")]
    assert any(n.startswith("samples") for n in images) and any(n.startswith("before_after") for n in images)
    assert (out / "wandb_run_id").read_text().strip() in runs[0].name


# ---- 7. the end summary uses the held-out evaluation ------------------------------------------------------
def test_summary_line_reports_the_held_out_j(digits_run):
    out, output = digits_run
    fe = json.loads((out / "final_eval.json").read_text())
    last = output.strip().splitlines()[-1]
    assert last.startswith("result (held-out: 10 fixed-noise samples")
    assert f"J {fe['before']['objective']:.4f} -> {fe['after']['objective']:.4f}" in last


# ---- 8. sample a run directory; did you mean; YAML line numbers; device message ---------------------------
def test_sample_accepts_a_run_directory(digits_run, tmp_path):
    r = run("sample", digits_run[0], "--steps", "2", "--n", "4", "--out", tmp_path, "--threads", "1")
    assert r.exit_code == 0, r.output
    r2 = run("sample", "--model", digits_run[0], "--steps", "2", "--n", "4", "--out", tmp_path / "b", "--threads", "1")
    assert r2.exit_code == 0, r2.output
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "samples.safetensors")), load_file(str(tmp_path / "b" / "samples.safetensors"))
    assert torch.equal(a["samples"], b["samples"]) and a["samples"].shape == (4, 1, 8, 8)
    r = run("sample", tmp_path, "--out", tmp_path / "c")
    assert r.exit_code == 1 and "not a ctrldiff run directory" in r.output


@pytest.mark.parametrize("args,msg", [
    (["train", "--algo", "ctrll"], "unknown --algo 'ctrll' (did you mean 'ctrl'?)"),
    (["train", "--solver", "ddmi"], "(did you mean 'ddim'?)"),
    (["train", "--reward", "digit-alignmnt"], "unknown reward 'digit-alignmnt' (did you mean 'digit-alignment'?)"),
    (["sample", "--solver", "dpmpp2m"], "unknown solver 'dpmpp2m' (did you mean 'dpmpp-2m'?)"),
    (["train", "--set", "algo=dpk"], "(did you mean 'dpok'?)"),
])
def test_did_you_mean(args, msg, tmp_path):
    r = run(*args, "--out", tmp_path / "o", *(["--threads", "1"]))
    assert r.exit_code == 1 and msg in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_yaml_error_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("algo: ctrl\nsampler:\n  steps: [10\n  solver: em\n")
    r = run("train", "--config", f, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "not valid YAML: line 4, column" in r.output and "started at line 3" in r.output


def test_device_error_is_not_cut_mid_word():
    from ctrldiff.train.trainer import _first_sentence

    long = "Cannot get CUDA generator without ATen_cuda library. PyTorch splits its backend into two libraries"
    assert _first_sentence(long) == "Cannot get CUDA generator without ATen_cuda library"
    text = _first_sentence("word " * 60)
    assert text.endswith("word ...") and len(text) <= 165
    r = run("train", "--device", "cuda", "--threads", "1") if not torch.cuda.is_available() else None
    if r is not None:
        line = r.output.strip()
        assert r.exit_code == 1 and line.count("(") == line.count(")") and "cuda / cuda:N" in line


# ---- 10. ctrldiff config, example configs ---------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGOS)
def test_config_prints_the_full_default_with_descriptions(algo):
    from ctrldiff.cli_config import ALGO_DEFAULTS, ALGO_SECTIONS

    r = run("config", "--algo", algo)
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(r.output)
    cfg, default = TrainConfig.model_validate(data), TrainConfig(algo=algo, **ALGO_DEFAULTS.get(algo, {}))
    assert cfg == default
    own = ALGO_SECTIONS[algo]
    assert own in data and not ({"ctrl", "ddpo", "lasro"} - {own}) & set(data)
    assert "# KL_path weight in J = E r - beta KL_path" in r.output and "# experiment trackers" in r.output
    assert yaml.safe_load(run("config", "--algo", algo, "--all").output).keys() == default.model_dump().keys()


def test_config_unknown_algo():
    r = run("config", "--algo", "ddpp")
    assert r.exit_code == 1 and "did you mean 'ddpo'" in r.output


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    from ctrldiff.cli_train import build_train_config

    cfg = build_train_config(None, str(path), {}, [])
    assert cfg.model and cfg.reward


def test_examples_cover_the_promised_setups():
    names = {p.name for p in (ROOT / "examples").glob("*.yaml")}
    assert {"digits-ctrl.yaml", "gmm2-exact.yaml", "sd15-lora.yaml", "sdxl-turbo-lasro.yaml"} <= names


# ---- 11. export of a built-in model run -------------------------------------------------------------------
def test_export_builtin_run(digits_run, tmp_path):
    from ctrldiff.models import load_model

    out = tmp_path / "hub"
    r = run("export", digits_run[0], "--out", out)
    assert r.exit_code == 0, r.output
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model.json", "README.md", "before_after.png", "config.yaml", "final_eval.json"} <= names
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "digits" and front["library_name"] == "ctrldiff" and "ctrl" in front["tags"]
    fe = json.loads((out / "final_eval.json").read_text())
    assert f"**{fe['after']['objective']:.4f}**" in card and "digit-confidence" in card and "beta" in card
    assert "KL_path" in card and "![same noise before and after fine-tuning](before_after.png)" in card
    assert load_model(out / "model.safetensors") is not None
    r = run("export", digits_run[0], "--out", out)
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = run("export", tmp_path, "--out", tmp_path / "x")
    assert r.exit_code == 1 and "not a ctrldiff run directory" in r.output
