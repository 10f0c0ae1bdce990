"""Starting the processes of a multi-process run (no torch import: this runs before the workers exist).

* :func:`launch_env` reads (rank, world size, local rank, local world size) from the launcher's environment:
  torchrun / ``accelerate launch --multi_gpu`` (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
  MASTER_PORT) or MPI (PMI_*, OMPI_COMM_WORLD_*, MV2_COMM_WORLD_*: ``accelerate launch --cpu --mpirun_hostfile``).
* ``accelerate launch --cpu --num_processes N`` on one machine without mpirun starts ONE process with
  ACCELERATE_USE_CPU=True and MASTER_ADDR / MASTER_PORT but no rank (accelerate 1.x, ``simple_launcher``; the
  process count is not passed on). :func:`accelerate_cpu_processes` recognises that case and reads N from the
  ``accelerate launch`` command line of the parent process (Linux /proc), and :func:`spawn_workers` then runs this
  process's own command line as the N workers, torchrun-style, and stops all of them when one fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from .errors import CtrlDiffError

_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise CtrlDiffError(f"environment variable {n}={v!r} is not an integer") from None
    return default


def launch_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from the launcher's environment; (0, 1, 0, 1) if none."""
    world = _env_int(_SIZE_VARS, 1)
    rank = _env_int(_RANK_VARS, 0)
    local_world = _env_int(_LOCAL_SIZE_VARS, world)
    local = _env_int(_LOCAL_RANK_VARS, rank % max(local_world, 1))
    if world < 1 or not 0 <= rank < world:
        raise CtrlDiffError(f"bad launcher environment: rank {rank} with world size {world}")
    return rank, world, local, local_world


def _parent_accelerate_num_processes() -> int | None:
    """--num_processes N of the ``accelerate launch`` command that started this process (Linux /proc), or None."""
    argv = _parent_argv()
    head = argv[:3]
    if not any("accelerate" in a for a in head) or not ("launch" in argv or "accelerate.commands.launch" in head):
        return None
    for i, a in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if a == flag and i + 1 < len(argv):
                return int(argv[i + 1]) if argv[i + 1].isdigit() else None
            if a.startswith(flag + "="):
                v = a.split("=", 1)[1]
                return int(v) if v.isdigit() else None
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the parent's cleanup still kills the workers
        pass


def accelerate_cpu_processes() -> int:
    """How many workers this process must start itself: N > 1 when it was started by ``accelerate launch --cpu
    --num_processes N`` (which starts one process and no rank environment), else 0."""
    if any(os.environ.get(v) for v in _SIZE_VARS + _RANK_VARS):
        return 0
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "MASTER_ADDR" not in os.environ:
        return 0  # accelerate sets MASTER_ADDR only when more than one process was asked for
    n = _parent_accelerate_num_processes()
    if n is None:
        raise CtrlDiffError("accelerate launch --cpu asked for several processes but started one (accelerate runs "
                            "multi-CPU jobs through mpirun only) and the process count could not be read: use "
                            "`accelerate launch --multi_gpu --num_processes N -m ctrldiff train ...` (works on CPU) "
                            "or `torchrun --nproc_per_node N -m ctrldiff train ...`")
    return n if n > 1 else 0


def spawn_workers(n: int, argv: list[str] | None = None) -> int:
    """Run ``argv`` (default: this process's own command line) as ``n`` workers with a torchrun-style
    environment; wait for all of them. When one fails, the others are stopped. Returns the exit status."""
    argv = argv or [sys.executable, *sys.orig_argv[1:]]
    port = os.environ.get("MASTER_PORT")
    if port in (None, "", "29500") and "--main_process_port" not in " ".join(_parent_argv()):
        port = str(_free_port())  # accelerate's default 29500 collides with any other run on the machine
    procs = []
    try:
        for r in range(n):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                       MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(port))
            procs.append(subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent))
        while True:
            codes = [p.poll() for p in procs]  # poll every worker: a failed one stops the rest
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _parent_argv() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
