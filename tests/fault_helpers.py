"""Test-only helpers for tests/test_reliability.py (no ``test_`` prefix: pytest does not collect this file).

* User rewards for ``--reward fault_helpers:NAME`` (put tests/ on PYTHONPATH) that score like the built-in
  ``toy2d-mode-switch`` but misbehave from epoch 2 on (one reward call per epoch while
  ``rollout_chunk >= batch_size``; classes, so every run gets a fresh call counter).
* ``python -m fault_helpers ARGS...`` runs ``ctrldiff ARGS...`` with one fault hook chosen by $CTRLDIFF_FAULT,
  so that a test can SIGKILL the real process at a precise point. At the fault the process touches
  $CTRLDIFF_FAULT_MARKER and hangs (for at most 120 s, so that a crashed test never leaves it behind):

    start            config.yaml is written, no epoch has run (inside the first sample-grid write)
    mid-epoch:N      inside epoch N's reward call: rollouts done, no update yet
    metrics-write:N  half of epoch N's metrics.jsonl line is written (a torn last line)
    ckpt-write:N     half of checkpoint epoch_N.pt's bytes are in its temp file (a torn write in progress)
    latest-write:N   epoch_N.pt is renamed into place but the ``latest`` pointer still names the previous one
    rotate:N         ``latest`` names epoch_N.pt, older checkpoints not yet deleted
    finish           the last checkpoint is written, the final outputs (figures, final model) are not

``run_cli(capsys, *args)`` runs the ``ctrldiff`` command line in the test's process -> (exit code, stdout, stderr).

In-process tests call ``install(fault, on_fault=..., setattr=monkeypatch.setattr)`` with an ``on_fault`` that
raises instead of hanging: the files are then left exactly as a SIGKILL at that point leaves them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

# ---- rewards --------------------------------------------------------------------------------------


class _FromEpoch2:
    """toy2d-mode-switch scores; ``bad(x, r)`` replaces them on calls >= ``start`` whose chunk is in ``chunks``."""

    start = 2
    chunks_per_epoch = 1
    bad_chunks = (0,)

    def __init__(self):
        from ctrldiff.rewards.base import make_reward

        self.base = make_reward("toy2d-mode-switch")
        self.calls = 0

    def __call__(self, x, cond=None):
        k, self.calls = self.calls, self.calls + 1
        r = self.base(x).detach()
        epoch, chunk = divmod(k, self.chunks_per_epoch)
        if epoch >= self.start and chunk in self.bad_chunks:
            return self.bad(x, r)
        return r

    def bad(self, x, r):  # pragma: no cover - overridden
        raise NotImplementedError


class nan_from_epoch2(_FromEpoch2):  # noqa: N801 - used as module:function on the command line
    def bad(self, x, r):
        r = r.clone()
        r[0] = float("nan")
        return r


class shape_from_epoch2(_FromEpoch2):  # noqa: N801
    def bad(self, x, r):
        return torch.stack([r, r], 1)  # [B, 2]


class raise_from_epoch2(_FromEpoch2):  # noqa: N801
    def bad(self, x, r):
        raise RuntimeError("scoring service unavailable")


class flaky_second_chunk(_FromEpoch2):  # noqa: N801
    """NaN on the second of two chunks per epoch (rollout_chunk = batch_size / 2) from epoch 2 on."""

    chunks_per_epoch = 2
    bad_chunks = (1,)

    def bad(self, x, r):
        return torch.full_like(r, float("nan"))


# ---- fault hooks ----------------------------------------------------------------------------------


def _hang() -> None:
    marker = os.environ.get("CTRLDIFF_FAULT_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    time.sleep(120)
    os._exit(3)  # never reached when the test kills us


def _fsync_write(path: Path, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def install(fault: str, on_fault=_hang, setattr=setattr) -> None:
    """Patch the trainer's I/O so that it stops at ``fault`` (see the module docstring) by calling ``on_fault``."""
    from ctrldiff.train import checkpoint, trainer

    kind, _, n = fault.partition(":")
    n = int(n or -1)
    name = f"epoch_{n:05d}.pt"
    real_write, real_append, real_call = checkpoint.atomic_write_bytes, trainer.append_jsonl, trainer.call_reward
    if kind == "start":
        real_samples = trainer.Trainer.save_samples

        def save_samples(self, tag):
            if tag == "epoch_00000":
                on_fault()
            real_samples(self, tag)

        setattr(trainer.Trainer, "save_samples", save_samples)
    elif kind == "mid-epoch":
        def call(reward, x, cond, batch_index=None, grad=False):
            if isinstance(batch_index, str) and batch_index.endswith(f"of epoch {n}"):
                on_fault()
            return real_call(reward, x, cond, batch_index, grad)

        setattr(trainer, "call_reward", call)
    elif kind == "metrics-write":
        def append(path, record):
            if record.get("epoch") == n:
                line = (json.dumps(record) + "\n").encode()
                _fsync_write(Path(path), line[: len(line) // 2], "ab")
                on_fault()
            real_append(path, record)

        setattr(trainer, "append_jsonl", append)
    elif kind in ("ckpt-write", "latest-write", "rotate"):
        def write(path, data):
            path = Path(path)
            if kind == "ckpt-write" and path.name == name:
                _fsync_write(path.with_name(f".{path.name}.tmp"), data[: len(data) // 2])
                on_fault()
            if kind == "latest-write" and path.name == "latest" and data == name.encode():
                on_fault()
            real_write(path, data)
            if kind == "rotate" and path.name == "latest" and data == name.encode():
                on_fault()

        setattr(checkpoint, "atomic_write_bytes", write)
    elif kind == "finish":
        def finish(self):
            on_fault()

        setattr(trainer.Trainer, "finish", finish)
    else:
        raise SystemExit(f"unknown CTRLDIFF_FAULT {fault!r}")


if __name__ == "__main__":
    if os.environ.get("CTRLDIFF_FAULT"):
        install(os.environ["CTRLDIFF_FAULT"])
    from ctrldiff.cli import main

    main(sys.argv[1:], prog_name="ctrldiff")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the ``ctrldiff`` command line in this process -> (exit code, stdout, stderr).

    Any exception other than the CLI's own exit escapes to pytest, so "no traceback" is checked for free."""
    from ctrldiff.cli import main

    capsys.readouterr()
    try:
        main.main(args=list(args), prog_name="ctrldiff")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
