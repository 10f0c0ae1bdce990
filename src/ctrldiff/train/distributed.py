r"""Multi-process (data-parallel) training: W processes, each sampling batch_size / W trajectories.

What is synchronised (docs/DISTRIBUTED.md):
* weights: every optimizer made by :meth:`Trainer.make_optimizer` broadcasts its parameters from process 0 when it
  is made and averages its gradients across processes in ``step()`` (one flattened all_reduce per step), so the
  policy, value networks, critics and surrogates of every algorithm stay identical on every process;
* minibatch loops: :meth:`Dist.minibatches` gives every process the same number of optimizer steps (a step that
  some process skips would deadlock the all_reduce) with a local minibatch of ceil(size / W) items, so the global
  minibatch and the number of steps per epoch are those of one process with the whole batch;
* batch statistics: :meth:`Dist.mean` / :meth:`Dist.std` / :meth:`Dist.all_gather_cat` give the statistics of
  the global batch (advantage normalisation, per-condition reward baselines, the logged metrics).

Single process (no launcher environment): :func:`get_dist` returns a :class:`Dist` with ``world_size == 1`` whose
methods return their input unchanged; no process group is made and nothing is imported beyond torch.

The process group is made with ``torch.distributed`` from the torchrun-style environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that ``torchrun`` and ``accelerate launch --multi_gpu`` set, or the MPI one
(PMI_* / OMPI_COMM_WORLD_*) of ``accelerate launch --cpu --mpirun_hostfile``: gloo on CPU, NCCL on CUDA (gloo when
processes share a GPU). ``accelerate launch --cpu --num_processes N`` without mpirun starts ONE process (accelerate
1.x runs multi-CPU jobs through mpirun only): :mod:`ctrldiff.launcher` makes that one process start the N workers.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
from torch import Tensor

from ..errors import CtrlDiffError
from ..launcher import launch_env

_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd 64-bit constant: rank r's generator seed is seed + r * stride (mod 2**63)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s own generators: ``seed`` itself for process 0 (so process 0 draws what a
    single process would), a distinct deterministic value for the others."""
    return seed if rank == 0 else (seed + rank * _SEED_STRIDE) % 2**63


class Dist:
    """The processes of a run. ``world_size == 1``: every method is the identity (no communication)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 backend: str | None = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")  # where collectives run (CUDA tensors for NCCL)
        self.backend = backend

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"

    # ---- collectives -------------------------------------------------------------------------------
    def _dist(self):
        import torch.distributed as td

        return td

    def barrier(self) -> None:
        if self.enabled:
            td = self._dist()
            if self.backend == "nccl":
                td.barrier(device_ids=[self.device.index or 0])
            else:
                td.barrier()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the processes (a new tensor; ``t`` itself when single)."""
        if not self.enabled:
            return t
        buf = t.detach().to(self.device, copy=True)
        self._dist().all_reduce(buf)
        return buf.to(t.device)

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        return t if not self.enabled else self.all_reduce_sum(t) / self.world_size

    def all_reduce_int(self, values: list[int], op: str = "sum") -> list[int]:
        """Integers reduced over the processes (sum, min or max), exactly (float64 holds them up to 2**53)."""
        if not self.enabled:
            return list(values)
        td = self._dist()
        buf = torch.tensor(values, dtype=torch.float64, device=self.device)
        td.all_reduce(buf, op={"sum": td.ReduceOp.SUM, "min": td.ReduceOp.MIN, "max": td.ReduceOp.MAX}[op])
        return [int(v) for v in buf.tolist()]

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        self._dist().all_gather_object(out, obj)
        return out

    def gather_object(self, obj) -> list | None:
        """Every process's ``obj`` on process 0 (rank order), None elsewhere."""
        if not self.enabled:
            return [obj]
        td = self._dist()
        if self.backend == "nccl":  # NCCL has no gather_object: all_gather
            out = self.all_gather_object(obj)
            return out if self.is_main else None
        out = [None] * self.world_size if self.is_main else None
        td.gather_object(obj, out, dst=0)
        return out

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Concatenation along dim 0 of every process's ``t`` (rank order; sizes may differ) -> [sum n_r, ...]."""
        if not self.enabled:
            return t
        td = self._dist()
        sizes = self.all_reduce_int([t.shape[0] if r == self.rank else 0 for r in range(self.world_size)])
        n_max = max(sizes)
        buf = torch.zeros((n_max, *t.shape[1:]), dtype=t.dtype, device=self.device)
        buf[: t.shape[0]] = t.detach().to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        td.all_gather(parts, buf)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(t.device)

    def all_gather_any(self, x):
        """:meth:`all_gather_cat` for a Tensor, list concatenation for a list (e.g. prompts), None for None."""
        if not self.enabled or x is None:
            return x
        if isinstance(x, Tensor):
            return self.all_gather_cat(x)
        return [v for part in self.all_gather_object(list(x)) for v in part]

    def broadcast_tensors(self, tensors: list[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with process ``src``'s values (one flattened broadcast per dtype)."""
        if not self.enabled or not tensors:
            return
        td = self._dist()
        with torch.no_grad():
            for group in _by_dtype(tensors).values():
                flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])
                td.broadcast(flat, src=src)
                off = 0
                for t in group:
                    t.copy_(flat[off:off + t.numel()].view_as(t))
                    off += t.numel()

    # ---- statistics of the global batch ------------------------------------------------------------
    def mean(self, x: Tensor, dim: int = 0) -> Tensor:
        """Mean over dim ``dim`` of the concatenation of every process's ``x`` (x.mean(dim) when single)."""
        if not self.enabled:
            return x.mean(dim)
        tot = self.all_reduce_sum(torch.cat([x.sum(dim).reshape(-1).double(), x.new_tensor([x.shape[dim]]).double()]))
        return (tot[:-1] / tot[-1]).to(x.dtype).reshape(x.sum(dim).shape)

    def var(self, x: Tensor, dim: int | None = 0, unbiased: bool = True) -> Tensor:
        """Variance over dim ``dim`` (None: all elements) of the global batch (x.var(dim) when single)."""
        if not self.enabled:
            return x.var(unbiased=unbiased) if dim is None else x.var(dim, unbiased=unbiased)
        if dim is None:
            x, dim = x.reshape(-1), 0
        m = self.mean(x, dim)
        d = x.double() - m.double().unsqueeze(dim)
        tot = self.all_reduce_sum(torch.cat([d.pow(2).sum(dim).reshape(-1), d.new_tensor([x.shape[dim]])]))
        return (tot[:-1] / (tot[-1] - (1 if unbiased else 0))).to(x.dtype).reshape(m.shape)

    def std(self, x: Tensor, dim: int | None = 0, unbiased: bool = True) -> Tensor:
        """Standard deviation over dim ``dim`` (None: all elements) of the global batch (x.std(dim) when single)."""
        if not self.enabled:
            return x.std(unbiased=unbiased) if dim is None else x.std(dim, unbiased=unbiased)
        return self.var(x, dim, unbiased).sqrt()

    # ---- loops ---------------------------------------------------------------------------------------
    def local_size(self, size: int) -> int:
        """This process's share of a global minibatch of ``size`` items: ceil(size / W)."""
        return max(1, math.ceil(size / self.world_size))

    def minibatches(self, n: int, size: int, generator: torch.Generator, device=None,
                    drop_last: bool = True) -> Iterator[Tensor]:
        """Shuffled index minibatches over ``n`` local items for a global minibatch of ``size`` items: each
        process takes ceil(size / W) of its own items per step (at most n), and every process yields the same
        number of minibatches (the smallest over the processes), so every optimizer step is taken everywhere.
        Single process: ``randperm(n)`` cut into ``min(size, n)`` slices (a partial last one unless drop_last)."""
        mb = min(self.local_size(size), n) if n else 1
        perm = torch.randperm(n, generator=generator, device=generator.device)
        if device is not None:
            perm = perm.to(device)
        starts = list(range(0, n - mb + 1, mb)) if drop_last else list(range(0, n, mb))
        if self.enabled:
            starts = starts[: self.all_reduce_int([len(starts)], "min")[0]]
        for s in starts:
            yield perm[s:s + mb]

    # ---- gradients -----------------------------------------------------------------------------------
    def average_grads(self, params: list[Tensor]) -> None:
        """Replace every parameter's gradient by its mean over the processes, in one flattened all_reduce.
        A parameter without a gradient counts as zero; it keeps ``grad = None`` only if no process has one."""
        if not self.enabled or not params:
            return
        dtype = torch.float32
        for p in params:
            if p.grad is not None:
                dtype = torch.promote_types(dtype, p.grad.dtype)
        parts = [p.grad.detach().reshape(-1).to(self.device, dtype) if p.grad is not None
                 else torch.zeros(p.numel(), dtype=dtype, device=self.device) for p in params]
        parts.append(torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=self.device))
        flat = torch.cat(parts)
        self._dist().all_reduce(flat)
        flat /= self.world_size
        has = flat[-len(params):] > 0
        off = 0
        for p, h in zip(params, has.tolist(), strict=True):
            g = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
            if not h:
                continue
            if p.grad is None:
                p.grad = g.to(p.device, p.dtype).clone()
            else:
                p.grad.copy_(g)

    def fingerprint(self, tensors: list[Tensor]) -> str:
        """sha256 of the bytes of ``tensors`` (to check that every process holds identical weights)."""
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _by_dtype(tensors: list[Tensor]) -> dict:
    out: dict = {}
    for t in tensors:
        out.setdefault(t.dtype, []).append(t)
    return out


class SyncedAdamW(torch.optim.AdamW):
    """AdamW whose ``step()`` first averages its parameters' gradients across the processes (once per step:
    call :meth:`sync_grads` before reading or clipping gradients, ``step`` then does not average again)."""

    def __init__(self, params, dist: Dist, **kw):
        super().__init__(params, **kw)
        self.dist = dist
        self._synced = False
        dist.broadcast_tensors(self._params())  # every process starts from process 0's values

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def sync_grads(self) -> None:
        if not self._synced:
            self.dist.average_grads(self._params())
            self._synced = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._synced = False

    def step(self, closure=None):
        if closure is not None:
            raise CtrlDiffError("multi-process training does not support optimizer closures")
        self.sync_grads()
        out = super().step()
        self._synced = False
        return out


def sync_grads(opt: torch.optim.Optimizer) -> None:
    """Average ``opt``'s gradients across processes now (before clipping); a no-op for a plain optimizer."""
    if isinstance(opt, SyncedAdamW):
        opt.sync_grads()


# ---- the process group ---------------------------------------------------------------------------------
_DIST: Dist | None = None


def _destroy() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        try:
            td.destroy_process_group()
        except Exception:  # noqa: BLE001 - at exit, best effort
            pass


def get_dist(device: str = "cpu") -> tuple[Dist, str]:
    """The run's :class:`Dist` and the device this process trains on.

    Single process: ``Dist()`` and ``device`` unchanged. Several: the process group is made once per process
    (gloo on CPU; NCCL on CUDA when every local process has its own GPU, else gloo) and ``device='cuda'`` becomes
    ``cuda:LOCAL_RANK``."""
    global _DIST
    rank, world, local, local_world = launch_env()
    if world == 1:
        return Dist(), device
    dev = device
    if device.startswith("cuda"):
        if device != "cuda":
            raise CtrlDiffError(f"invalid config: device: {device!r} with {world} processes: use device=cuda "
                                "(each process takes cuda:LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise CtrlDiffError("invalid config: device: 'cuda' cannot be used here (no CUDA device)")
        n_gpu = torch.cuda.device_count()
        dev = f"cuda:{local % n_gpu}"
        torch.cuda.set_device(torch.device(dev))
    if _DIST is not None:
        return _DIST, dev
    import atexit

    import torch.distributed as td

    if not td.is_available():
        raise CtrlDiffError("this torch build has no torch.distributed: multi-process training is unavailable")
    backend = os.environ.get("CTRLDIFF_DIST_BACKEND")
    if backend is None:
        backend = "nccl" if dev.startswith("cuda") and torch.cuda.device_count() >= local_world else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = timedelta(seconds=float(os.environ.get("CTRLDIFF_DIST_TIMEOUT", "1800")))
    if not td.is_initialized():
        kw = {"device_id": torch.device(dev)} if backend == "nccl" else {}
        try:
            td.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                  timeout=timeout, **kw)
        except Exception as e:  # noqa: BLE001 - port in use, unreachable master, ...
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CtrlDiffError(f"could not join the {world}-process group at {os.environ['MASTER_ADDR']}:"
                                f"{os.environ['MASTER_PORT']} as process {rank} ({why})") from None
        atexit.register(_destroy)
    cdev = torch.device(dev) if backend == "nccl" else torch.device("cpu")
    _DIST = Dist(rank, world, local, cdev, backend)
    return _DIST, dev
