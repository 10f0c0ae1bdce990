"""Reliability of ``ctrldiff train``: real SIGKILLs and resume, determinism across processes, config / reward /
resource errors, atomic checkpoint writes.

The real-process scenarios (``python -m ctrldiff.cli train ...``, and ``python -m fault_helpers train ...`` for a
kill at a precise point, see tests/fault_helpers.py) start together on a background thread when this module's
first test runs, so that they overlap with the in-process tests; the tests that check them come last.
In-process kill points use the same hooks with an ``on_fault`` that raises instead of hanging, which leaves the
run directory exactly as a SIGKILL at that point would. The real-process tests are marked ``slow``
(``-m "not slow"`` leaves the processes out).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import fault_helpers
from ctrldiff.cli import main
from ctrldiff.errors import CtrlDiffError
from ctrldiff.train import checkpoint as ckpt_mod
from ctrldiff.train import trainer as trainer_mod
from ctrldiff.train.checkpoint import latest_checkpoint, load_latest_checkpoint, save_checkpoint
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer, load_run_config

TESTS = Path(__file__).resolve().parent
SIGKILL = signal.SIGKILL
# a small, fast run: 2-D exact model, 16 trajectories x 4 EM steps per epoch, a checkpoint every epoch
SMALL = ["--model", "gmm2-exact", "--reward", "toy2d-mode-switch", "--batch-size", "16", "--steps", "4",
         "--set", "log.checkpoint_every=1", "--set", "log.tensorboard=false", "--set", "log.num_eval_samples=16",
         "--set", "log.num_final_eval=0", "--quiet", "--threads", "1"]
EPOCHS = 5


# ---- helpers ------------------------------------------------------------------------------------------------
def _strip_s(line: str) -> str:
    """A metrics.jsonl line with its wall-clock fields (``*_s``) cut out, byte for byte otherwise."""
    return re.sub(r', "[^"]*_s": -?[0-9.eE+-]+', "", line)


def _metrics(run: Path) -> list[str]:
    return [_strip_s(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _final_state(run: Path) -> dict:
    path, st, rejected = load_latest_checkpoint(run / "checkpoints")
    assert path is not None and not rejected
    return st


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


_cli = fault_helpers.run_cli


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTRLDIFF_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _hash_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the real processes (background) -------------------------------------------------------------------------
class _Procs:
    """Starts every real-process scenario at once and drives the kills and resumes on a background thread."""

    def __init__(self, root: Path):
        self.root = root
        self.live: list[subprocess.Popen] = []
        self.obs: dict = {}
        self.closing = False

    def start(self, name: str, args: list[str], module: str = "ctrldiff.cli", **env: str) -> subprocess.Popen:
        if self.closing:
            raise RuntimeError("test module finished")
        with open(self.root / f"{name}.stdout", "wb") as out, open(self.root / f"{name}.stderr", "wb") as err:
            p = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=err, cwd=self.root,
                                 env=_env(**env))
        p.name = name
        self.live.append(p)
        return p

    def finish(self, p: subprocess.Popen, timeout: float = 240) -> dict:
        rc = p.wait(timeout)
        return {"rc": rc, "stdout": (self.root / f"{p.name}.stdout").read_text(),
                "stderr": (self.root / f"{p.name}.stderr").read_text()}

    def run(self) -> dict:
        r = self.root
        train = ["train", *SMALL, "--epochs", str(EPOCHS)]
        procs = {
            "ref_ctrl": self.start("ref_ctrl", [*train, "--algo", "ctrl", "--out", "ref_ctrl"]),
            # the twin goes through the package's __main__: python -m ctrldiff
            "twin_ctrl": self.start("twin_ctrl", [*train, "--algo", "ctrl", "--out", "twin_ctrl"], "ctrldiff"),
            "kill_ctrl": self.start("kill_ctrl", [*train, "--algo", "ctrl", "--out", "kill_ctrl"]),
            "kill_ddpo": self.start("kill_ddpo", [*train, "--algo", "ddpo", "--out", "kill_ddpo"], "fault_helpers",
                                    CTRLDIFF_FAULT="ckpt-write:3", CTRLDIFF_FAULT_MARKER=str(r / "ddpo.hung")),
            # (ctrl.certify_z=0 where a fault helper counts reward calls as epochs: the certification's would shift them)
            "bad_reward": self.start("bad_reward", ["train", *SMALL, "--epochs", "4", "--out", "bad_reward",
                                                    "--reward", "fault_helpers:raise_from_epoch2",
                                                    "--set", "ctrl.certify_z=0"]),
        }
        # SIGKILL kill_ctrl as soon as it has written a checkpoint of epoch >= 2 (any point of its loop after
        # that), and kill_ddpo while half of checkpoint epoch_00003.pt is written to its temp file
        pending = {"kill_ctrl", "kill_ddpo"}
        deadline = time.monotonic() + 180
        while pending and time.monotonic() < deadline:
            if "kill_ctrl" in pending:
                ptr = r / "kill_ctrl" / "checkpoints" / "latest"
                name = ptr.read_text() if ptr.exists() else ""
                if name >= "epoch_00002.pt" or procs["kill_ctrl"].poll() is not None:
                    procs["kill_ctrl"].send_signal(SIGKILL)
                    self.obs["kill_ctrl_pointer"] = name
                    pending.discard("kill_ctrl")
            if "kill_ddpo" in pending and ((r / "ddpo.hung").exists() or procs["kill_ddpo"].poll() is not None):
                procs["kill_ddpo"].send_signal(SIGKILL)
                pending.discard("kill_ddpo")
            time.sleep(0.002)
        res = {}
        for name in ("kill_ctrl", "kill_ddpo"):
            res[name] = self.finish(procs[name])
            run = r / name
            ck = run / "checkpoints"
            metrics = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
            _, st, rejected = load_latest_checkpoint(ck) if ck.is_dir() else (None, None, [])
            self.obs[name] = {
                "latest": latest_checkpoint(ck).name if ck.is_dir() and latest_checkpoint(ck) else None,
                "tmp_files": {p.name: p.stat().st_size for p in ck.glob(".*.tmp")} if ck.is_dir() else {},
                "metrics_lines": len(metrics.splitlines()), "torn_last_line": bool(metrics) and metrics[-1] != "\n",
                "loadable": st["epoch"] if st else None, "rejected": rejected,
            }
        resumed = {n: self.start(f"{n}_resume", ["train", "--resume", n, "--quiet", "--threads", "1"])
                   for n in ("kill_ctrl", "kill_ddpo")}
        for name, p in procs.items():
            if name not in res:
                res[name] = self.finish(p)
        for name, p in resumed.items():
            res[f"{name}_resume"] = self.finish(p)
        res["obs"] = self.obs
        return res

    def kill_all(self) -> None:
        self.closing = True
        for p in self.live:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    """Future of the real-process results; started by the first test of this module."""
    ps = _Procs(tmp_path_factory.mktemp("procs"))
    pool = ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(ps.run)
    fut.root = ps.root
    yield fut
    ps.kill_all()
    pool.shutdown(wait=True)


@pytest.fixture(autouse=True, scope="module")
def _start_procs_early(request):
    """Start the real processes with this module's first test, if any selected test checks them."""
    if any("real" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("procs")
    yield


# ---- in-process kill points ----------------------------------------------------------------------------------
class _Killed(BaseException):
    """Stands in for SIGKILL: raised at the fault point, nothing of the run after it happens."""


def _raise_killed():
    raise _Killed


def _cfg(algo: str = "ctrl", **kw) -> TrainConfig:
    base = dict(algo=algo, model="gmm2-exact", reward="toy2d-mode-switch", epochs=4, batch_size=16,
                sampler=dict(solver="em", steps=4),
                log=dict(progress=False, tensorboard=False, checkpoint_every=1, num_eval_samples=16, num_final_eval=0))
    base.update(kw)
    return TrainConfig(**base)


_REFS: dict = {}


def _reference(algo: str, tmp_path_factory) -> tuple[list[str], dict]:
    if algo not in _REFS:
        out = tmp_path_factory.mktemp(f"ref_{algo}") / "run"
        Trainer(_cfg(algo), out).train()
        _REFS[algo] = (_metrics(out), _final_state(out))
    return _REFS[algo]


# fault -> (epoch of the checkpoint a resume must pick, or None for "no checkpoint yet")
KILL_POINTS = {"start": None, "mid-epoch:2": 2, "metrics-write:2": 2, "ckpt-write:3": 2, "latest-write:3": 2,
               "rotate:3": 3, "finish": 4}


@pytest.mark.parametrize("algo,fault", [("ctrl", f) for f in KILL_POINTS]
                         + [("ddpo", "mid-epoch:2"), ("reward-backprop", "mid-epoch:2"),
                            ("diffusion-dpo", "mid-epoch:2")])
def test_kill_point_then_resume_matches_uninterrupted(algo, fault, tmp_path, tmp_path_factory, monkeypatch):
    ref_metrics, ref_state = _reference(algo, tmp_path_factory)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fault_helpers.install(fault, on_fault=_raise_killed, setattr=m.setattr)
        with pytest.raises(_Killed):
            Trainer(_cfg(algo), out).train()
    # what the kill left: the checkpoint a resume takes is complete, and it is the newest complete one
    path, st, rejected = load_latest_checkpoint(out / "checkpoints")
    assert not rejected
    assert (st["epoch"] if st else None) == KILL_POINTS[fault]
    if fault.startswith("metrics-write"):
        assert not (out / "metrics.jsonl").read_text().endswith("\n")  # a torn last line
    if fault.startswith("ckpt-write"):
        assert (out / "checkpoints" / ".epoch_00003.pt.tmp").stat().st_size > 0
    resumed = Trainer(load_run_config(out), out, resume=True)
    assert resumed.epoch == (KILL_POINTS[fault] or 0)
    resumed.train()
    assert _metrics(out) == ref_metrics
    _assert_same_weights(_final_state(out), ref_state)
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert (out / "reward_curve.png").exists() and (out / "samples" / "before_after.png").exists()


def test_corrupt_newest_checkpoint_is_passed_over(tmp_path, tmp_path_factory, monkeypatch, caplog):
    """A truncated newest checkpoint (bit rot, a copy cut short) and a garbage ``latest`` pointer are never taken:
    the resume falls back to the newest readable checkpoint and still matches the uninterrupted run."""
    ref_metrics, ref_state = _reference("ctrl", tmp_path_factory)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fault_helpers.install("mid-epoch:3", on_fault=_raise_killed, setattr=m.setattr)
        with pytest.raises(_Killed):
            Trainer(_cfg(), out).train()
    ck = out / "checkpoints"
    newest = ck / "epoch_00003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    for pointer in (b"epoch_00003.pt", b"../config.yaml", b"\xff\xfe garbage"):
        (ck / "latest").write_bytes(pointer)
        path, st, rejected = load_latest_checkpoint(ck)
        assert path.name == "epoch_00002.pt" and st["epoch"] == 2
        assert len(rejected) == 1 and rejected[0].startswith("epoch_00003.pt (")
    resumed = Trainer(load_run_config(out), out, resume=True)
    assert resumed.epoch == 2
    assert "epoch_00003.pt" in caplog.text
    resumed.train()
    assert _metrics(out) == ref_metrics
    _assert_same_weights(_final_state(out), ref_state)


def test_resume_with_only_corrupt_checkpoints_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_cfg(epochs=2), out).train()
    for p in (out / "checkpoints").glob("epoch_*.pt"):
        p.write_bytes(b"PK\x03\x04 truncated")
    code, _, err = _cli(capsys, "train", "--resume", str(out))
    line = _one_error_line(err)
    assert code == 1 and "no readable checkpoint" in line and "epoch_00002.pt" in line


def test_kill_before_config_is_written(tmp_path, capsys, monkeypatch):
    """Killed after the directory check but before config.yaml: --resume says so; a fresh start is allowed."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "dump_yaml", lambda *a: _raise_killed())
        with pytest.raises(_Killed):
            Trainer(_cfg(epochs=1), out)
    code, _, err = _cli(capsys, "train", "--resume", str(out))
    assert code == 1 and "no config.yaml" in _one_error_line(err)
    Trainer(_cfg(epochs=1), out).train()  # the directory holds nothing: no --overwrite needed


def test_config_yaml_is_written_atomically(tmp_path, monkeypatch):
    """A kill while config.yaml is written must not leave a truncated config that resumes with defaults."""
    from ctrldiff import config as config_mod

    out = tmp_path / "run"
    Trainer(_cfg(epochs=1), out)
    before = (out / "config.yaml").read_bytes()

    def torn_dump(*a, **k):
        raise OSError(errno.EIO, "I/O error")

    with monkeypatch.context() as m:
        m.setattr(config_mod.yaml, "safe_dump", lambda *a, **k: "algo: ddpo\nepo")  # a torn document ...
        m.setattr(config_mod.os, "replace", torn_dump)  # ... that never gets renamed into place
        with pytest.raises(OSError):
            config_mod.dump_yaml(_cfg(epochs=1), out / "config.yaml")
    assert (out / "config.yaml").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


# ---- bad rewards through the CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize("reward,msg", [("nan_from_epoch2", "non-finite"), ("shape_from_epoch2", "shape (16, 2)"),
                                        ("raise_from_epoch2", "raised RuntimeError: scoring service unavailable")])
def test_bad_user_reward_is_one_error_line_and_keeps_the_last_checkpoint(reward, msg, tmp_path, capsys):
    out = tmp_path / "run"
    # (ctrl.certify_z=0: the helper counts reward calls as epochs, and the certification's calls would shift them)
    code, _, err = _cli(capsys, "train", *SMALL, "--epochs", "4", "--reward", f"fault_helpers:{reward}",
                        "--set", "ctrl.certify_z=0", "--out", str(out))
    line = _one_error_line(err)
    assert code == 1 and f"reward 'fault_helpers:{reward}'" in line and "batch" in line and msg in line
    st = _final_state(out)
    assert st["epoch"] == 2 and all(torch.isfinite(v).all() for v in st["model"].values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    if reward != "nan_from_epoch2":
        return
    # the last good checkpoint carries on with a working reward
    code, _, err = _cli(capsys, "train", "--resume", str(out), "--set", "reward=toy2d-mode-switch", "--quiet")
    assert code == 0, err
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_skip_policy_counts_skipped_rewards_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", *SMALL, "--epochs", "4", "--reward", "fault_helpers:flaky_second_chunk",
                        "--set", "ctrl.certify_z=0",  # (the helper counts reward calls as epochs)
                        "--set", "reward_errors=skip", "--set", "rollout_chunk=8", "--out", str(out))
    assert code == 0, err
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_skipped"] for r in recs] == [0, 0, 8, 16]  # the second chunk of 8 in epochs 2 and 3
    assert all(math.isfinite(r["reward_mean"]) for r in recs)


# ---- bad configs: one line, before any compute ------------------------------------------------------------------
@pytest.fixture
def no_compute(monkeypatch):
    """Any config error must come before the model is built (let alone trained)."""
    def boom(*a, **k):
        raise AssertionError("compute started before the config was checked")

    monkeypatch.setattr(trainer_mod, "build_task", boom)


@pytest.mark.parametrize("args,needles", [
    (["--set", "bogus=1"], ["unknown key 'bogus'", "takes: algo"]),
    (["--set", "sampler.stpes=3"], ["unknown key 'sampler.stpes'", "did you mean 'steps'"]),
    (["--set", "epochs=many"], ["epochs", "valid integer", "'many'"]),
    (["--set", "log.tensorboard=maybe"], ["log.tensorboard", "valid boolean"]),
    (["--steps", "-3"], ["sampler.steps", "greater than or equal to 1", "-3"]),
    (["--beta", "-0.5"], ["beta", "greater than or equal to 0", "-0.5"]),
    (["--set", "optim.lr=.inf"], ["optim.lr", "finite number"]),
    (["--set", "beta=.nan"], ["beta", "finite number"]),
    (["--set", "algo=nope"], ["algo", "Input should be 'ctrl', 'ddpo', 'ddpo-sf', 'dpok'", "'nope'"]),
    (["--set", "sampler.solver=rk4"], ["sampler.solver", "'em', 'ddim', 'ode-euler' or 'eta'"]),
    (["--algo", "ddpo", "--solver", "ode-euler"], ["algo 'ddpo' needs stochastic rollouts", "sampler.solver",
                                                   "policy_std"]),
    (["--algo", "dpok", "--solver", "ddim", "--set", "sampler.eta=0"], ["algo 'dpok'", "eta=0", "policy_std"]),
    (["--set", "sampler=5"], ["sampler", "5"]),
    (["--set", "sampler.steps.x=1"], ["sampler.steps", "not a section"]),
    (["--set", "novalue"], ["novalue", "key=value"]),
    (["--set", "seed=" + "[" * 600], ["nested too deeply"]),
    (["--set", "seed=100000000000000000000000"], ["seed", "2**64"]),
    (["--device", "gpu"], ["device", "'gpu'"]),
    (["--threads", "0"], ["--threads", ">= 1"]),
    (["--beta", "abc"], ["--beta", "'abc' is not a valid float"]),
])
def test_bad_config_is_one_error_line_before_any_compute(args, needles, tmp_path, capsys, no_compute):
    out = tmp_path / "run"
    code, stdout, err = _cli(capsys, "train", *SMALL, "--epochs", "2", *args, "--out", str(out))
    line = _one_error_line(err)
    assert code != 0 and stdout == ""
    for n in needles:
        assert n in line, (n, line)
    assert not out.exists()


def test_bad_config_files(tmp_path, capsys, no_compute):
    cases = {"missing.yaml": None, "list.yaml": b"- a\n- b\n", "scalar.yaml": b"42\n", "bad.yaml": b"algo: [ctrl\n",
             "binary.yaml": b"\xff\xfe\x00\x81", "deep.yaml": b"seed: " + b"[" * 600 + b"]" * 600 + b"\n",
             "unknown.yaml": b"algo: ctrl\nsampler:\n  steps: 4\n  solverr: em\n"}
    expect = {"missing.yaml": "config file not found", "list.yaml": "must hold a mapping",
              "scalar.yaml": "must hold a mapping", "bad.yaml": "not valid YAML", "binary.yaml": "not a text",
              "deep.yaml": "nested too deeply", "unknown.yaml": "unknown key 'sampler.solverr'"}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        code, _, err = _cli(capsys, "train", "--config", str(tmp_path / name), "--out", str(tmp_path / "run"))
        assert code != 0 and expect[name] in _one_error_line(err), (name, err)
    (tmp_path / "adir").mkdir()
    code, _, err = _cli(capsys, "train", "--config", str(tmp_path / "adir"), "--out", str(tmp_path / "run"))
    assert code == 2 and "is a directory" in _one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_new_flags(tmp_path, capsys):
    code, _, err = _cli(capsys, "train", "--resume", str(tmp_path), "--algo", "ddpo")
    assert code == 1 and "--resume continues a run with its saved config" in _one_error_line(err)


# ---- resources -----------------------------------------------------------------------------------------------
def test_unwritable_output_directory_is_caught_before_training(tmp_path, capsys, no_compute):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = _cli(capsys, "train", *SMALL, "--out", str(blocker / "run"))  # fails for root too
    assert code == 1 and "is not writable" in _one_error_line(err) and "Not a directory" in err
    if os.geteuid() != 0:  # chmod does not stop root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            code, _, err = _cli(capsys, "train", *SMALL, "--out", str(ro / "run"))
            assert code == 1 and "is not writable" in _one_error_line(err)
        finally:
            ro.chmod(0o700)


def test_full_disk_is_caught_before_training(tmp_path, monkeypatch, no_compute):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(trainer_mod, "atomic_write_bytes", full)
    with pytest.raises(CtrlDiffError, match="is not writable: No space left on device"):
        Trainer(_cfg(), tmp_path / "run")


class _TornFile:
    """A file whose write stores half the data, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def test_disk_full_mid_run_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def torn_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        return _TornFile(f) if Path(path).name == ".epoch_00003.pt.tmp" else f

    monkeypatch.setattr(ckpt_mod, "open", torn_open, raising=False)
    code, _, err = _cli(capsys, "train", *SMALL, "--epochs", "5", "--out", str(out))
    line = _one_error_line(err)
    assert code == 1 and "No space left on device" in line and "last good checkpoint: epoch_00002.pt" in line
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "epoch_00002.pt" and not (ck / "epoch_00003.pt").exists()
    assert not list(ck.glob(".*.tmp"))  # the failed write cleaned up after itself
    assert _final_state(out)["epoch"] == 2
    monkeypatch.undo()
    code, _, err = _cli(capsys, "train", "--resume", str(out), "--quiet")
    assert code == 0, err


def test_existing_run_is_never_overwritten_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", *SMALL, "--epochs", "1", "--out", str(out))
    assert code == 0, err
    (out / "final_eval.json").write_text("{}")  # an output of the old run the new one does not write
    before = _hash_tree(out)
    code, _, err = _cli(capsys, "train", *SMALL, "--epochs", "2", "--out", str(out))
    line = _one_error_line(err)
    assert code == 1 and "--resume" in line and "--overwrite" in line
    assert _hash_tree(out) == before
    code, _, err = _cli(capsys, "train", *SMALL, "--epochs", "2", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / "final_eval.json").exists()  # nothing stale of the old run survives --overwrite


@pytest.mark.parametrize("kind", ["missing", "empty", "not-a-run"])
def test_resume_without_a_run_is_a_clear_error(kind, tmp_path, capsys, no_compute):
    d = tmp_path / "d"
    if kind != "missing":
        d.mkdir()
    if kind == "not-a-run":
        (d / "notes.txt").write_text("hello")
    code, _, err = _cli(capsys, "train", "--resume", str(d))
    assert code == 1 and "cannot resume" in _one_error_line(err)


# ---- atomic checkpoint writes ---------------------------------------------------------------------------------
def _two_checkpoints(ck: Path) -> dict:
    for e in (1, 2):
        save_checkpoint({"epoch": e, "model": {"w": torch.full((3,), float(e))}}, ck, e, keep=2)
    return _hash_tree(ck)


def _assert_untouched(ck: Path, before: dict) -> None:
    assert _hash_tree(ck) == before  # no new file, no temp litter, pointer and checkpoints byte-identical
    path, st, rejected = load_latest_checkpoint(ck)
    assert path.name == "epoch_00002.pt" and st["epoch"] == 2 and not rejected


def test_checkpoint_write_failing_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    ck = tmp_path / "checkpoints"
    before = _two_checkpoints(ck)
    real_save = torch.save

    def torch_save_dies(obj, f, *a, **k):  # serialisation dies after writing part of the archive
        real_save({"partial": torch.zeros(100)}, f)
        raise RuntimeError("killed mid torch.save")

    monkeypatch.setattr(torch, "save", torch_save_dies)
    with pytest.raises(RuntimeError):
        save_checkpoint({"epoch": 3, "model": {}}, ck, 3)
    _assert_untouched(ck, before)
    monkeypatch.undo()

    def torn_open(path, mode="r", *a, **k):
        return _TornFile(open(path, mode, *a, **k))

    monkeypatch.setattr(ckpt_mod, "open", torn_open, raising=False)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 3, "model": {}}, ck, 3)
    _assert_untouched(ck, before)
    monkeypatch.undo()

    def replace_fails(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ckpt_mod.os, "replace", replace_fails)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 3, "model": {}}, ck, 3)
    _assert_untouched(ck, before)


def test_torn_pointer_write_keeps_the_pointer(tmp_path, monkeypatch):
    """The checkpoint is in place but writing ``latest`` fails: the old pointer stays, and a resume takes a
    complete checkpoint either way."""
    ck = tmp_path / "checkpoints"
    _two_checkpoints(ck)
    real_open = open

    def torn_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return _TornFile(f) if Path(path).name == ".latest.tmp" else f

    monkeypatch.setattr(ckpt_mod, "open", torn_open, raising=False)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 3, "model": {"w": torch.zeros(3)}}, ck, 3)
    assert (ck / "latest").read_text() == "epoch_00002.pt" and not (ck / ".latest.tmp").exists()
    assert load_latest_checkpoint(ck)[1]["epoch"] == 2


# ---- the real processes: checked last, after they have run alongside the tests above ---------------------------
@pytest.fixture(scope="module")
def real(procs):
    return procs.result(timeout=400)


@pytest.fixture(scope="module")
def cli_ddpo_reference(tmp_path_factory):
    """The uninterrupted ddpo run, through the same command line in this process (ctrl's is a real process)."""
    out = tmp_path_factory.mktemp("cli_ref") / "ref_ddpo"
    code = main.main(args=["train", *SMALL, "--epochs", str(EPOCHS), "--algo", "ddpo", "--out", str(out)],
                     prog_name="ctrldiff", standalone_mode=False)
    assert code in (None, 0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ctrl", "ddpo"])
def test_sigkill_then_resume_matches_uninterrupted_run(real, procs, algo, request):
    root = procs.root
    killed, resumed = real[f"kill_{algo}"], real[f"kill_{algo}_resume"]
    if algo == "ctrl":
        assert real["ref_ctrl"]["rc"] == 0, real["ref_ctrl"]["stderr"]
        ref = root / "ref_ctrl"
    else:
        ref = request.getfixturevalue("cli_ddpo_reference")
    assert killed["rc"] == -SIGKILL, "the run finished before it could be killed"
    obs = real["obs"][f"kill_{algo}"]
    if algo == "ctrl":  # killed somewhere after its checkpoint of epoch >= 2 appeared
        assert real["obs"]["kill_ctrl_pointer"] >= "epoch_00002.pt"
        assert obs["loadable"] is not None and 2 <= obs["loadable"] < EPOCHS
    else:  # killed while half of epoch_00003.pt was in its temp file: that is never taken as the latest
        assert obs["latest"] == "epoch_00002.pt" and obs["loadable"] == 2
        assert obs["tmp_files"].get(".epoch_00003.pt.tmp", 0) > 0
    assert resumed["rc"] == 0, resumed["stderr"]
    assert len(_metrics(ref)) == EPOCHS
    assert _metrics(root / f"kill_{algo}") == _metrics(ref)
    _assert_same_weights(_final_state(root / f"kill_{algo}"), _final_state(ref))
    assert not list((root / f"kill_{algo}" / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_two_processes_with_the_same_seed_write_identical_metrics(real, procs):
    """``python -m ctrldiff.cli train`` and ``python -m ctrldiff train``, same seed and config."""
    assert real["ref_ctrl"]["rc"] == 0 and real["twin_ctrl"]["rc"] == 0
    assert "run directory: twin_ctrl" in real["twin_ctrl"]["stdout"]
    a = (procs.root / "ref_ctrl" / "metrics.jsonl").read_text()
    b = (procs.root / "twin_ctrl" / "metrics.jsonl").read_text()
    assert len(a.splitlines()) == EPOCHS
    assert _strip_s(a) == _strip_s(b)  # byte for byte, wall-clock fields aside
    assert a != _strip_s(a)  # (the *_s fields were there and were cut)
    _assert_same_weights(_final_state(procs.root / "ref_ctrl"), _final_state(procs.root / "twin_ctrl"))


@pytest.mark.slow
def test_real_process_errors_are_one_line(real, procs):
    """A user reward (tests/ on PYTHONPATH) that raises from epoch 2 on, in a real process: one ``error:`` line
    naming the reward and the batch, exit 1; the last good checkpoint is intact and loadable."""
    r = real["bad_reward"]
    needle = "reward 'fault_helpers:raise_from_epoch2' on batch 0 of epoch 2 raised RuntimeError"
    assert r["rc"] == 1 and needle in _one_error_line(r["stderr"]), r
    st = _final_state(procs.root / "bad_reward")
    assert st["epoch"] == 2 and all(torch.isfinite(v).all() for v in st["model"].values())
    assert len((procs.root / "bad_reward" / "metrics.jsonl").read_text().splitlines()) == 2
