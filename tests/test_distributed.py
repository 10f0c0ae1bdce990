"""Multi-process training: real 2-process runs through ``accelerate launch --cpu`` (ctrldiff starts the workers),
``accelerate launch --multi_gpu`` (torchrun; works on CPU with gloo) and ``torchrun``, plus in-process checks.

The 2-process runs start together on a background thread when the first test that reads them runs (each one is
its own session, killed at teardown or on timeout, so no process is left behind); the in-process tests come first
(one of them forks a 2-process gloo group, before any thread is started).
Every run checks at each checkpoint that its processes hold identical weights (sha256 of the model and of every
optimizer's parameters and state, stored per process in the checkpoint) and stops with an error if not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ctrldiff.errors import CtrlDiffError
from ctrldiff.train.checkpoint import load_latest_checkpoint
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.distributed import Dist, rank_seed
from ctrldiff.train.trainer import Trainer

HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
needs_accelerate = pytest.mark.skipif(not HAS_ACCELERATE, reason="accelerate is not installed (pip install accelerate)")
B = 16  # global batch: 8 trajectories per process
COMMON = ["--model", "gmm2-exact", "--reward", "toy2d-mode-switch", "--batch-size", str(B), "--steps", "4",
          "--set", "log.checkpoint_every=1", "--set", "log.tensorboard=false", "--set", "log.num_eval_samples=16",
          "--set", "log.num_final_eval=0", "--set", "optim.minibatch=16", "--set", "ctrl.value.minibatch=16",
          "--quiet", "--threads", "1"]
SCRATCH = ["--algo", "q-learning", "--model", "scratch-gmm2", "--reward", "toy2d-mode-switch", "--batch-size", str(B),
           "--steps", "4", "--beta", "1.0", "--set", "log.checkpoint_every=1", "--set", "log.tensorboard=false",
           "--set", "log.num_eval_samples=16", "--set", "log.num_final_eval=0", "--set", "qlearning.m=256",
           "--set", "qlearning.critic.minibatch=16", "--set", "optim.minibatch=16", "--quiet", "--threads", "1"]
EPOCHS = 3
# the two baselines that override Algorithm.update (one cheap run each): 8 samples per process
BASE = ["--model", "gmm2-exact", "--batch-size", str(B), "--steps", "4", "--epochs", "2", "--set",
        "log.checkpoint_every=1", "--set", "log.tensorboard=false", "--set", "log.num_eval_samples=16", "--set",
        "log.num_final_eval=0", "--set", "optim.inner_epochs=2", "--quiet", "--threads", "1"]
RB = ["--algo", "reward-backprop", "--reward", "toy2d-quadratic", "--set", "reward_backprop.minibatch=6", *BASE]
# a margin makes the processes' pair counts differ: both must still take the same number of steps
DPO = ["--algo", "diffusion-dpo", "--reward", "toy2d-mode-switch", "--set", "diffusion_dpo.minibatch=8", "--set",
       "diffusion_dpo.margin=0.3", *BASE]
# the METHODS section 9 baselines: DiffusionNFT with one group of 16 rollouts that spans both processes' halves of
# the batch (the group statistics are global), Flow-GRPO-Fast's window drawn once per epoch from the shared generator
NEW = {
    "adjoint-matching": ["--algo", "adjoint-matching", "--reward", "toy2d-quadratic", "--beta", "0.5",
                         "--set", "optim.minibatch=16", *BASE],
    "flow-grpo-fast": ["--algo", "flow-grpo", "--reward", "toy2d-mode-switch", "--solver", "eta", "--set",
                       "sampler.eta=0.7", "--set", "flow_grpo.window=2", "--set", "flow_grpo.group_size=4",
                       "--set", "optim.minibatch=8", *BASE],
    "diffusion-nft": ["--algo", "diffusion-nft", "--reward", "toy2d-mode-switch", "--solver", "ddim", "--set",
                      "sampler.eta=0", "--set", "diffusion_nft.group_size=16", "--set", "diffusion_nft.minibatch=8",
                      *BASE],
}


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _accelerate(*extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *extra, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _port(), "-m", "ctrldiff"]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", _port(), "-m", "ctrldiff"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("ACCELERATE_")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR",
               CTRLDIFF_DIST_TIMEOUT="120")  # a lost peer stops a collective after 2 minutes, not 30
    return env


class _Runs:
    """Every 2-process scenario, started at once; each is its own session so that teardown can kill it all."""

    def __init__(self, root: Path):
        self.root, self.live, self.closing = root, [], False

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        if self.closing:
            raise RuntimeError("test module finished")
        with open(self.root / f"{name}.out", "wb") as out, open(self.root / f"{name}.err", "wb") as err:
            p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=self.root, env=_env(), start_new_session=True)
        p.name = name
        self.live.append(p)
        return p

    def finish(self, p: subprocess.Popen, timeout: float = 300) -> dict:
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
        return {"rc": rc, "out": (self.root / f"{p.name}.out").read_text(),
                "err": (self.root / f"{p.name}.err").read_text()}

    def run(self) -> dict:
        train = ["train", *COMMON]
        acc_cpu = _accelerate("--cpu") if HAS_ACCELERATE else None
        procs = {}
        if HAS_ACCELERATE:
            procs["ctrl"] = self.start("ctrl", [*acc_cpu, *train, "--epochs", str(EPOCHS), "--out", "ctrl"])
            procs["ddpo"] = self.start("ddpo", [*_accelerate("--multi_gpu"), *train, "--algo", "ddpo", "--epochs",
                                                str(EPOCHS), "--out", "ddpo"])
        procs["qlearning"] = self.start("qlearning", [*_torchrun(), "train", *SCRATCH, "--epochs", "2",
                                                      "--out", "qlearning"])
        procs["reward-backprop"] = self.start("reward-backprop", [*_torchrun(), "train", *RB, "--out", "rb"])
        procs["diffusion-dpo"] = self.start("diffusion-dpo", [*_torchrun(), "train", *DPO, "--out", "dpo"])
        for name, args in NEW.items():
            procs[name] = self.start(name, [*_torchrun(), "train", *args, "--out", name])
        res = {}
        if "ctrl" in procs:
            # the interrupted run: the finished run's directory as it was after epoch 2's checkpoint
            res["ctrl"] = self.finish(procs["ctrl"])
            if res["ctrl"]["rc"] == 0:
                part = self.root / "part"
                shutil.copytree(self.root / "ctrl", part)
                (part / "checkpoints" / f"epoch_{EPOCHS:05d}.pt").unlink()
                (part / "checkpoints" / "latest").write_text(f"epoch_{EPOCHS - 1:05d}.pt")
                for name in ("reward_curve.png", "samples/before_after.png"):
                    (part / name).unlink()
                resume = self.start("resume", [*_accelerate("--cpu"), "train", "--resume", "part", "--quiet",
                                               "--threads", "1"])
                res["resume"] = self.finish(resume)
        for name, p in procs.items():
            if name not in res:
                res[name] = self.finish(p)
        return res

    def kill_all(self) -> None:
        self.closing = True
        for p in self.live:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    rs = _Runs(tmp_path_factory.mktemp("dist"))
    pool = ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(rs.run)
    fut.root = rs.root
    yield fut
    rs.kill_all()
    pool.shutdown(wait=False)


@pytest.fixture
def real(runs):
    """The finished runs (waits for the background thread)."""
    return runs.result(timeout=600), runs.root


def _cfg(**kw) -> TrainConfig:
    base = dict(algo="ctrl", model="gmm2-exact", reward="toy2d-mode-switch", beta=0.05, epochs=1, batch_size=B,
                sampler=dict(solver="em", steps=4), optim=dict(minibatch=16),
                log=dict(progress=False, tensorboard=False, num_eval_samples=16, num_final_eval=0))
    base.update(kw)
    return TrainConfig(**base)


def _strip_s(line: str) -> str:
    return re.sub(r', "[^"]*_s": -?[0-9.eE+-]+', "", line)


def _check_ok(res: dict) -> None:
    assert res["rc"] == 0, res["err"][-3000:]
    assert "Traceback" not in res["err"], res["err"][-3000:]


def _final(run: Path) -> dict:
    path, st, rejected = load_latest_checkpoint(run / "checkpoints")
    assert path is not None and not rejected
    return st


def _assert_in_sync(st: dict, cfg: TrainConfig) -> None:
    """Both processes recorded the same weights digest, and it is the digest of the saved weights."""
    assert st["world_size"] == 2 and len(st["rank_states"]) == 2
    digests = [s["weights_sha256"] for s in st["rank_states"]]
    assert digests[0] == digests[1]
    tr = Trainer(cfg)  # one process, the same run's structure: recompute the digest from the checkpoint
    tr.task.model.load_state_dict(st["model"])
    tr.optimizer.load_state_dict(st["optimizer"])
    tr.algo.load_state_dict(st["algo"])
    assert Dist().fingerprint(tr._sync_tensors()) == digests[0]


# ---- in-process -------------------------------------------------------------------------------------------
def test_batch_size_must_split_over_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(CtrlDiffError, match=r"batch_size: 15 .* 2 processes \(use a multiple of 2\)"):
        Trainer(_cfg(batch_size=15))


def test_diffusion_dpo_needs_pairs_per_process():
    from ctrldiff.algorithms.diffusion_dpo import DiffusionDPO

    tr = Trainer(_cfg(algo="diffusion-dpo", model="scratch-gmm2-cond", batch_size=8))  # 2 classes: 8 >= 4
    tr.dist = Dist(1, 2)  # as process 1 of 2 (the check needs no collective): 3 samples each, fewer than 2 x 2
    with pytest.raises(CtrlDiffError, match=r"batch_size=6 \(3 per process with 2 processes\) .* \(use >= 8\)"):
        DiffusionDPO(tr.cfg.model_copy(update={"batch_size": 6}), tr)


def test_single_process_dist_is_the_identity():
    d = Dist()
    x = torch.randn(6, 3)
    assert d.all_gather_cat(x) is x and d.all_gather_any(None) is None
    assert torch.equal(d.mean(x, 0), x.mean(0)) and torch.equal(d.std(x, None), x.std())
    assert [len(i) for i in d.minibatches(10, 4, torch.Generator().manual_seed(0))] == [4, 4]
    assert [len(i) for i in d.minibatches(10, 4, torch.Generator().manual_seed(0), drop_last=False)] == [4, 4, 2]
    # a 2-process share of a global minibatch of 5 items is 3 per process
    assert Dist(0, 2).local_size(5) == 3 and Dist(1, 2).local_size(16) == 8
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(4)}) == 4


def test_accelerate_cpu_single_process_is_not_spawned(monkeypatch):
    from ctrldiff.launcher import accelerate_cpu_processes

    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert accelerate_cpu_processes() == 0  # no MASTER_ADDR: accelerate was asked for one process
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(CtrlDiffError, match="--multi_gpu"):  # pytest is not an `accelerate launch` parent
        accelerate_cpu_processes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accelerate_cpu_processes() == 0  # a launcher set the ranks already


def test_a_failing_worker_stops_the_others(tmp_path):
    from ctrldiff.launcher import spawn_workers

    code = ("import os, sys, time, pathlib; r = int(os.environ['RANK']); assert os.environ['WORLD_SIZE'] == '2'; "
            f"pathlib.Path(r'{tmp_path}', str(r)).write_text(str(os.getpid())); "
            "time.sleep(120) if r == 0 else (time.sleep(0.5), sys.exit(3))")
    t0 = time.monotonic()
    assert spawn_workers(2, [sys.executable, "-c", code]) == 3
    assert time.monotonic() - t0 < 60
    pid = int((tmp_path / "0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # process 0 was stopped (and reaped), not left behind


def _run_forked_pair(worker, tmp_path) -> None:
    """Fork two processes ``worker(rank, port, out_path)`` (a gloo pair) and require both to exit cleanly."""
    import multiprocessing as mp

    ctx, port = mp.get_context("fork"), _port()
    ps = [ctx.Process(target=worker, args=(r, port, str(tmp_path / f"{r}.pt"))) for r in (0, 1)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in ps] == [0, 0]


def _collectives_worker(rank: int, port: str, out: str) -> None:
    """Process ``rank`` of 2 (forked): exercises Dist with unequal local sizes and missing gradients."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    from ctrldiff.train import distributed

    distributed._DIST = None
    d, dev = distributed.get_dist("cpu")
    x = torch.arange(3.0 + rank * 2).reshape(-1, 1) + 10 * rank  # process 0: 3 rows, process 1: 5 rows
    res = {"cat": d.all_gather_cat(x), "any": d.all_gather_any(["a"] * (rank + 1)), "mean": d.mean(x, 0),
           "std": d.std(x, None), "n_mb": len(list(d.minibatches(len(x), 4, torch.Generator().manual_seed(0))))}
    w = torch.nn.Parameter(torch.zeros(2))
    v = torch.nn.Parameter(torch.zeros(1))
    opt = distributed.SyncedAdamW([w, v], d, lr=0.1)
    (w * torch.tensor([1.0, 2.0]) * (rank + 1)).sum().backward()  # v has no gradient anywhere
    opt.sync_grads()
    res["grad"], res["v_grad"] = w.grad.clone(), v.grad
    torch.save(res, out)
    distributed._destroy()


def test_collectives_with_unequal_batches(tmp_path):
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer imports torch._dynamo (seconds):
    _run_forked_pair(_collectives_worker, tmp_path)  # here, once, not in both children
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    full = torch.cat([torch.arange(3.0).reshape(-1, 1), torch.arange(5.0).reshape(-1, 1) + 10])
    for r in (r0, r1):
        assert torch.equal(r["cat"], full) and r["any"] == ["a", "a", "a"]
        torch.testing.assert_close(r["mean"], full.mean(0))
        torch.testing.assert_close(r["std"], full.std())
        assert r["n_mb"] == 1  # per process ceil(4 / 2) = 2 items a step: 1 full step on process 0, 2 on 1 -> 1
        torch.testing.assert_close(r["grad"], torch.tensor([1.5, 3.0]))  # mean of (1, 2) and (2, 4)
        assert r["v_grad"] is None


def _gradient_step_worker(rank: int, port: str, out: str) -> None:
    """Process ``rank`` of 2 (forked): one ``gradient_step`` with local gradients 3 (process 0) and -1 (process 1)."""
    from types import SimpleNamespace

    from ctrldiff.algorithms.base import gradient_step

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    from ctrldiff.train import distributed

    distributed._DIST = None
    d, _ = distributed.get_dist("cpu")
    w = torch.nn.Parameter(torch.zeros(1))
    opt = distributed.SyncedAdamW([w], d, lr=0.1)
    tr = SimpleNamespace(optimizer=opt, trainable_parameters=[w], epoch=0, sync_grads=distributed.sync_grads,
                         cfg=SimpleNamespace(optim=SimpleNamespace(grad_clip=2.0)))
    slope = 3.0 if rank == 0 else -1.0
    info = gradient_step(SimpleNamespace(trainer=tr, name="test"), lambda sub: (slope * w.sum(), {}), torch.arange(2))
    torch.save({"grad_norm": info["grad_norm"], "grad": w.grad.clone()}, out)
    distributed._destroy()


def test_gradient_step_clips_the_averaged_gradient(tmp_path):
    """The mean gradient (3 - 1) / 2 = 1 is under the clip 2: applied whole. Clipping each process's own gradient
    first would give (2 - 1) / 2 = 0.5."""
    _run_forked_pair(_gradient_step_worker, tmp_path)
    for r in (0, 1):
        res = torch.load(tmp_path / f"{r}.pt")
        assert res["grad_norm"] == pytest.approx(1.0) and torch.equal(res["grad"], torch.tensor([1.0]))


# ---- the real 2-process runs ------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_accelerate
def test_ctrl_two_processes_in_sync_and_global_metrics(real):
    res, root = real
    _check_ok(res["ctrl"])
    assert "2 processes" in res["ctrl"]["out"] and res["ctrl"]["out"].count("run directory:") == 1
    run = root / "ctrl"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == list(range(EPOCHS))  # written once, by process 0
    # the global reward statistics are those of both processes' trajectories: process r samples its B/2 with its
    # own generator (seed rank_seed(0, r)) from the same initial weights; recompute epoch 0 in this process
    halves = []
    for r in (0, 1):
        tr = Trainer(_cfg(batch_size=B // 2, seed=rank_seed(0, r)))
        tr.cpu_gen.manual_seed(0 + 1)  # the shared generator (conditions, the epoch's random time grid): seed 0's
        halves.append(tr.collect().rewards)
    r = torch.cat(halves)
    assert recs[0]["reward_mean"] == float(r.mean()) and recs[0]["reward_std"] == float(r.std())
    assert not torch.equal(halves[0], halves[1])
    # ... and the 64 of ctrl.certify_z at the first and at the last epoch (32 on each process), at two grids
    cert = [128 + 128 * (e == EPOCHS - 1) for e in range(EPOCHS)]
    assert [x["reward_queries"] - x["value_reward_queries"] for x in recs] == [B * (e + 1) + c
                                                                             for e, c in enumerate(cert)]
    assert recs[-1]["value_reward_queries"] == EPOCHS * B * 4  # R(x0_hat) at every visited state of both
    n_pairs = (B - 2 * 2) * 4  # each process holds 2 of its 8 trajectories out of the update (ctrl.held_out 0.25)
    assert recs[0]["train/updates"] == n_pairs // 16  # the global minibatch: 8 pairs per process per step
    cfg = _cfg(epochs=EPOCHS, ctrl=dict(value=dict(minibatch=16)))
    _assert_in_sync(_final(run), cfg)
    assert (run / "samples" / "before_after.png").exists() and (run / "reward_curve.png").exists()


@pytest.mark.slow
@needs_accelerate
def test_resumed_two_process_run_matches_uninterrupted(real):
    res, root = real
    _check_ok(res["resume"])
    assert "2 processes" in res["resume"]["out"]
    a = [_strip_s(x) for x in (root / "ctrl" / "metrics.jsonl").read_text().splitlines()]
    b = [_strip_s(x) for x in (root / "part" / "metrics.jsonl").read_text().splitlines()]
    assert a == b
    assert (root / "part" / "reward_curve.png").exists()  # the resumed run wrote the final outputs again
    sa, sb = _final(root / "ctrl"), _final(root / "part")
    assert sa["epoch"] == sb["epoch"] == EPOCHS
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["rank_states"][1]["weights_sha256"] == sb["rank_states"][1]["weights_sha256"]
    assert torch.equal(sa["rank_states"][1]["rng"]["gen"], sb["rank_states"][1]["rng"]["gen"])


@pytest.mark.slow
@needs_accelerate
def test_ddpo_two_processes_through_torchrun_launcher(real):
    res, root = real
    _check_ok(res["ddpo"])
    st = _final(root / "ddpo")
    _assert_in_sync(st, _cfg(algo="ddpo", epochs=EPOCHS))
    # the per-condition reward buffer saw both processes' rewards: B per epoch, the same on both processes
    assert len(st["algo"]["stats"]["buffers"]["None"]) == min(EPOCHS * B, 64)
    assert st["rank_states"][1]["algo"]["stats"] == st["algo"]["stats"]
    assert len((root / "ddpo" / "metrics.jsonl").read_text().splitlines()) == EPOCHS


@pytest.mark.slow
def test_qlearning_two_processes_with_torchrun(real):
    res, root = real
    _check_ok(res["qlearning"])
    st = _final(root / "qlearning")
    digests = [s["weights_sha256"] for s in st["rank_states"]]
    assert st["epoch"] == 2 and digests[0] == digests[1]
    # each process's ratio estimator draws its own data subsets
    assert not torch.equal(st["algo"]["ratio_gen"], st["rank_states"][1]["algo"]["ratio_gen"])
    recs = [json.loads(x) for x in (root / "qlearning" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1] and recs[-1]["reward_queries"] > 2 * B


@pytest.mark.slow
def test_reward_backprop_two_processes_in_sync(real):
    res, root = real
    _check_ok(res["reward-backprop"])
    st = _final(root / "rb")
    assert st["epoch"] == 2
    _assert_in_sync(st, _cfg(algo="reward-backprop", reward="toy2d-quadratic", epochs=2, optim=dict(inner_epochs=2),
                             reward_backprop=dict(minibatch=6)))
    recs = [json.loads(x) for x in (root / "rb" / "metrics.jsonl").read_text().splitlines()]
    # the global minibatch of 6 samples (3 per process): 2 steps per inner epoch, as one process with all 16
    assert [r["train/updates"] for r in recs] == [4, 4]
    # one gradient reward call per sample per inner epoch, counted over both processes
    assert [r["value_reward_queries"] for r in recs] == [2 * 12, 4 * 12]
    assert torch.equal(st["rng"]["cpu_gen"], st["rank_states"][1]["rng"]["cpu_gen"])  # the shared generator


@pytest.mark.slow
def test_diffusion_dpo_two_processes_in_sync_with_unequal_pairs(real):
    res, root = real
    _check_ok(res["diffusion-dpo"])
    st = _final(root / "dpo")
    assert st["epoch"] == 2
    _assert_in_sync(st, _cfg(algo="diffusion-dpo", epochs=2, optim=dict(inner_epochs=2),
                             diffusion_dpo=dict(minibatch=8, margin=0.3)))
    recs = [json.loads(x) for x in (root / "dpo" / "metrics.jsonl").read_text().splitlines()]
    # an odd total: the processes formed different numbers of pairs that epoch (the case that would deadlock
    # if each process counted its own steps)
    assert any(r["dpo/pairs"] % 2 for r in recs), [r["dpo/pairs"] for r in recs]
    for r in recs:  # pairs within each process's own 8 samples (2 groups of 4: at most 12), 4 of them per step
        assert 0 < r["dpo/pairs"] <= 24 and r["train/updates"] <= 2 * (r["dpo/pairs"] // 8)
    # pair groups / order / times come from each process's own generator; the shared cpu_gen stays in step
    assert not torch.equal(st["algo"]["pair_gen"], st["rank_states"][1]["algo"]["pair_gen"])
    assert torch.equal(st["rng"]["cpu_gen"], st["rank_states"][1]["rng"]["cpu_gen"])



@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NEW))
def test_new_baselines_two_processes_in_sync(real, name):
    """Adjoint Matching, Flow-GRPO-Fast and DiffusionNFT as 2 processes: the same weights on both (the digest of the
    saved ones), global metrics, one shared generator; Flow-GRPO-Fast trains on the same window on both processes
    (the same number of steps), DiffusionNFT's old policy (its EMA) is the same on both."""
    res, root = real
    _check_ok(res[name])
    st = _final(root / name)
    assert st["epoch"] == 2
    kw: dict = {"epochs": 2, "optim": dict(inner_epochs=2, minibatch=16)}  # the optimizer state is that of AdamW
    if name == "adjoint-matching":
        kw.update(algo=name, reward="toy2d-quadratic", beta=0.5)
    elif name == "flow-grpo-fast":
        kw.update(algo="flow-grpo", sampler=dict(solver="eta", eta=0.7, steps=4),
                  flow_grpo=dict(window=2, group_size=4))
    else:
        kw.update(algo=name, sampler=dict(solver="ddim", eta=0.0, steps=4),
                  diffusion_nft=dict(group_size=16, minibatch=8))
    _assert_in_sync(st, _cfg(**kw))
    assert torch.equal(st["rng"]["cpu_gen"], st["rank_states"][1]["rng"]["cpu_gen"])
    recs = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1] and recs[-1]["reward_queries"] == 2 * B + (
        2 * B if name == "adjoint-matching" else 0)  # AM: one gradient query per sample per epoch
    if name == "flow-grpo-fast":  # 8 samples x 2 window steps per process, 4 per step, 2 inner epochs
        assert [r["train/updates"] for r in recs] == [8, 8]
    if name == "diffusion-nft":
        assert all(torch.equal(a, b) for a, b in zip(st["algo"]["old"], st["rank_states"][1]["algo"]["old"],
                                                      strict=True))
