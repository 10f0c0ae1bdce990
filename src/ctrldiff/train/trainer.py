"""The one RL trainer: rollout -> reward -> KL_path -> algorithm.prepare -> algorithm.update -> log.

Every algorithm (CTRL, DDPO, DDPO-SF, DPOK, ...) runs through this loop; an algorithm only supplies its
update rule (``ctrldiff.algorithms``). Launched as several processes (``accelerate launch``, ``torchrun``; see
``train/distributed.py`` and docs/DISTRIBUTED.md), each samples batch_size / W trajectories and the optimizers
average their gradients, so the run is one process's run with the same global batch; process 0 writes the outputs.
A run directory holds:
    config.yaml, metrics.jsonl, samples/, checkpoints/, final_model.{safetensors,json},
    reward_curve.png, samples/before_after.png (+ .json: per-sample rewards), tensorboard/ and wandb/ (log.trackers)
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..algorithms import ALGORITHMS
from ..algorithms.base import copy_into
from ..config import build_config, dump_yaml, load_yaml
from ..errors import CtrlDiffError, RewardError
from ..guidance import with_guidance, with_reference_below
from ..rewards.base import call_reward, make_reward
from ..solvers import data_end_time, evaluate_along, get_solver, jittered_grid, kl_increments, prediction_of
from ..trajectory import cat_trajectories
from .checkpoint import (
    append_jsonl,
    atomic_write_bytes,
    latest_checkpoint,
    load_latest_checkpoint,
    read_jsonl,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import SyncedAdamW, get_dist, launch_env, rank_seed, sync_grads
from .task import Task, build_task


def check_runtime_config(cfg: TrainConfig, device: str | None = None) -> torch.device:
    """Check the config values only the runtime can judge (device, seed range) before any file or compute."""
    try:
        dev = torch.device(device or cfg.device)
        torch.Generator(device=dev)
        torch.empty(0, device=dev)
    except Exception as e:  # noqa: BLE001 - unknown device string, CUDA not built/available, ...
        why = _first_sentence(str(e)) or type(e).__name__
        raise CtrlDiffError(f"invalid config: device: {cfg.device!r} cannot be used here ({why}); "
                            "use cpu, or cuda / cuda:N on a machine with a GPU") from None
    if not -(2**63) <= cfg.seed <= 2**64 - 2:
        raise CtrlDiffError(f"invalid config: seed: must lie in [-2**63, 2**64 - 2] (torch generator range), "
                            f"got {cfg.seed}")
    return dev


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of an exception's message, cut at a word boundary (never mid-word) when too long."""
    line = (text.strip().splitlines() or [""])[0]
    line = line.split(". ")[0].rstrip(".")
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, create: bool = True) -> None:
    """Refuse to clobber an existing run; check the directory is writable before any compute (``create=False``:
    the checks that only read, for the processes other than process 0)."""
    existing = out.exists() and any(out.iterdir())
    if existing and not (resume or overwrite):
        raise CtrlDiffError(f"output directory {out} already holds files; pass --resume to continue that run "
                            "or --overwrite to replace it")
    if resume and not (out / "config.yaml").exists():
        raise CtrlDiffError(f"cannot resume: {out} has no config.yaml (not a ctrldiff run directory)")
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        atomic_write_bytes(probe, b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise CtrlDiffError(f"output directory {out} is not writable: {e.strerror or e}") from None
    if overwrite and not resume:
        import shutil

        for name in ("metrics.jsonl", "checkpoints", "samples", "tensorboard", "final_eval.json", "reward_curve.png",
                     "final_model.safetensors", "final_model.json", "lora", "pipeline"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def add_warmup(opt: torch.optim.Optimizer, lr: float, steps: int) -> None:
    """Linear learning-rate warmup: step k (1, 2, ...) of ``opt`` uses lr * min(1, k / steps). The step count is
    read from the optimizer's own state (saved in checkpoints), so a resumed run continues the same schedule."""

    def pre_hook(o, args, kwargs):
        st = next((o.state[p] for g in o.param_groups for p in g["params"] if p in o.state), None)
        done = int(st["step"]) if st is not None and "step" in st else 0
        for g in o.param_groups:
            g["lr"] = lr * min(1.0, (done + 1) / steps)

    opt.register_step_pre_hook(pre_hook)


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path | None = None, *, task: Task | None = None,
                 reward=None, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(out) if out is not None else None
        world = launch_env()[1]
        if cfg.batch_size % world:
            raise CtrlDiffError(f"invalid config: batch_size: {cfg.batch_size} trajectories cannot be split evenly "
                                f"over {world} processes (use a multiple of {world})")
        self.dist, device = get_dist(cfg.device)  # one process: Dist(world_size=1), no process group
        self.device = check_runtime_config(cfg, device)
        if self.out is not None:
            prepare_run_dir(self.out, resume, overwrite, create=False)
            self.dist.barrier()  # every process has checked the directory before process 0 writes into it
            if self.dist.is_main:
                prepare_run_dir(self.out, resume, overwrite)
            self.dist.barrier()
        self.optimizers: list[torch.optim.Optimizer] = []
        self._seed_everything(cfg.seed)
        self.task = task or build_task(cfg.model, cfg.process, str(self.device), diffusers=cfg.diffusers)
        apply_config_defaults(cfg, self.task.config_defaults)
        self.task.check_sampler(cfg.sampler)
        self.process = self.task.process
        self.reward = make_reward(reward if reward is not None else cfg.reward)
        self.ref = with_guidance(self.task.ref, cfg.sampler.guidance)
        self.policy = with_reference_below(with_guidance(self.task.model, cfg.sampler.guidance), self.ref,
                                           data_end_time(self.process, cfg.sampler.steps)
                                           if cfg.sampler.reference_data_end else None)
        self.trainable_parameters = list(self.task.trainable)
        if not self.trainable_parameters:
            raise CtrlDiffError(f"model {cfg.model!r} has no trainable parameters")
        self.optimizer = self.make_optimizer(self.trainable_parameters, lr=cfg.optim.lr,
                                             weight_decay=cfg.optim.weight_decay)
        if cfg.optim.warmup_steps:
            add_warmup(self.optimizer, cfg.optim.lr, cfg.optim.warmup_steps)
        self.ema: list[torch.Tensor] | None = None
        self.end_epoch: int | None = None  # while train() runs: the run's last epoch + 1
        if cfg.optim.ema_decay > 0:
            self.ema = [p.detach().clone() for p in self.trainable_parameters]
            self.optimizer.register_step_post_hook(lambda *_: self._update_ema())
        rc = cfg.optim.recompute_log_prob_old
        self.recompute_log_prob_old = runs_reduced_precision(self.task.model) if rc is None else rc
        self.algo = ALGORITHMS[cfg.algo](cfg, self)
        if cfg.optim.reuse_rollout_graph:
            from ..algorithms.base import Algorithm

            if type(self.algo).update is not Algorithm.update:
                raise CtrlDiffError(f"optim.reuse_rollout_graph works with the shared policy-update loop; {cfg.algo!r} "
                                    "has its own update")
            n_pairs = cfg.batch_size * cfg.sampler.steps
            if self.algo.inner_epochs() != 1 or self.algo.minibatch_size(n_pairs) < n_pairs:
                raise CtrlDiffError("optim.reuse_rollout_graph needs one policy step per epoch: optim.inner_epochs=1 "
                                    f"and optim.minibatch >= batch_size * steps ({n_pairs})")
        s = cfg.sampler
        solver_kw = {"eta": s.eta} if s.solver in ("ddim", "eta") else {}
        self.solver = get_solver(s.solver, **solver_kw)
        self.times = self.process.time_grid(s.steps, device=self.device)
        self.random_grid = s.random_grid
        if self.random_grid is None:
            self.random_grid = self.algo.any_grid and self.process.continuous_time
        elif self.random_grid and not (self.algo.any_grid and self.process.continuous_time):
            why = (f"algo {cfg.algo!r} trains on its fixed grid" if not self.algo.any_grid
                   else f"the {self.process.name!r} schedule takes its training timesteps only")
            raise CtrlDiffError(f"sampler.random_grid=true cannot be used here: {why} (leave it unset)")
        if s.random_grid_space != "time" and not self.random_grid:
            raise CtrlDiffError(f"sampler.random_grid_space={s.random_grid_space} needs the random grid, which this run "
                                "does not draw (sampler.random_grid is off here)")
        self.epoch = 0
        self.reward_queries = 0
        self.value_reward_queries = 0
        self.reward_skipped = 0
        self.wall_s = 0.0
        self._trackers = None
        if self.out is not None:
            if resume:
                self._resume()
            elif self.dist.is_main:
                dump_yaml(cfg, self.out / "config.yaml")
            self.dist.barrier()

    # ---- randomness -------------------------------------------------------------------------------
    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        # the rollout noise is each process's own; cpu_gen (conditions, minibatch order) is shared by all processes
        self.gen = torch.Generator(device=self.device).manual_seed(rank_seed(seed, self.dist.rank))
        self.cpu_gen = torch.Generator().manual_seed(seed + 1)

    def _rng_state(self) -> dict:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "gen": self.gen.get_state(), "cpu_gen": self.cpu_gen.get_state()}

    def _set_rng_state(self, st: dict) -> None:
        random.setstate(st["python"])
        np.random.set_state(st["numpy"])
        torch.set_rng_state(st["torch"])
        self.gen.set_state(st["gen"])
        self.cpu_gen.set_state(st["cpu_gen"])

    def make_optimizer(self, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """Every optimizer of a run (policy, value networks, critics, surrogates) is made here, so that the
        trainer owns how their gradients are applied: with several processes, the optimizer starts every process
        from process 0's parameters and averages the gradients across processes in ``step()``."""
        if self.dist.enabled:
            opt = SyncedAdamW(list(params), self.dist, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
        self.optimizers.append(opt)
        return opt

    def sync_grads(self, opt: torch.optim.Optimizer) -> None:
        """Average ``opt``'s gradients across processes now, e.g. before clipping them (``step()`` does it
        otherwise); nothing with one process."""
        sync_grads(opt)

    def minibatches(self, n: int, size: int, device=None, drop_last: bool = True,
                    generator: torch.Generator | None = None):
        """Shuffled index minibatches (``cpu_gen``, or ``generator``) over ``n`` local items for a global minibatch
        of ``size``: every loop that steps an optimizer iterates these, so every process takes the same number of
        steps (:meth:`ctrldiff.train.distributed.Dist.minibatches`). Pass a per-process ``generator`` when ``n``
        differs between processes, so that the shared ``cpu_gen`` stays in step on every process."""
        return self.dist.minibatches(n, size, self.cpu_gen if generator is None else generator, device, drop_last)

    def process_seed(self, seed: int) -> int:
        """A seed for a generator of this process's own (``seed`` on process 0, distinct on the others)."""
        return rank_seed(seed, self.dist.rank)

    def count_queries(self, n: int, kind: str = "terminal") -> None:
        self.reward_queries += n
        if kind == "value":
            self.value_reward_queries += n

    # ---- rollouts ----------------------------------------------------------------------------------
    def _score(self, x, cond, batch_index: str):
        self.count_queries(x.shape[0])
        try:
            return call_reward(self.reward, self.task.decode(x), self.task.reward_cond(cond), batch_index)
        except RewardError:
            if self.cfg.reward_errors == "skip":
                return None
            raise

    def collect(self):
        """Sample ``batch_size`` trajectories (this process's batch_size / W of them) with the current policy and
        score them -> RolloutBatch. Conditions are drawn for the global batch and each process takes its slice."""
        from ..algorithms.base import RolloutBatch

        cfg, dist = self.cfg, self.dist
        n_local = cfg.batch_size // dist.world_size
        conds = self.algo.sample_conditions(cfg.batch_size, self.cpu_gen)
        if conds is not None and dist.enabled:
            conds = conds[dist.rank * n_local:(dist.rank + 1) * n_local]
        where = f" (process {dist.rank})" if dist.enabled else ""
        space = self.process if cfg.sampler.random_grid_space == "log_snr" else None
        times = jittered_grid(self.times, self.cpu_gen, space) if self.random_grid else self.times  # one per epoch
        trajs, futures = [], []
        pool = ThreadPoolExecutor(max_workers=1) if cfg.reward_async else None
        try:
            for i, start in enumerate(range(0, n_local, cfg.rollout_chunk)):
                n = min(cfg.rollout_chunk, n_local - start)
                cond = None if conds is None else conds[start:start + n].to(self.device)
                x = torch.randn((n, *self.task.sample_shape), generator=self.gen, device=self.device)
                kw = self.algo.rollout_kwargs()
                if cfg.optim.reuse_rollout_graph:  # keep eps_theta's graph; the states stay plain samples
                    kw.update(grad=True, detach_states=True)
                traj = self.solver(self.policy, x * self.process.prior_std(), times, self.process, cond,
                                   generator=self.gen, **kw)
                trajs.append(traj)
                args = (traj.final, cond, f"{i}{where} of epoch {self.epoch}")
                futures.append(pool.submit(self._score, *args) if pool else args)
            rewards = [f.result() if pool else self._score(*f) for f in futures]
        finally:
            if pool:
                pool.shutdown()
        keep = [i for i, r in enumerate(rewards) if r is not None]
        self.reward_skipped += sum(len(trajs[i].final) for i in range(len(trajs)) if rewards[i] is None)
        if not keep:
            raise RewardError(f"reward {self.reward.name!r} failed on every batch of epoch {self.epoch}; "
                              "nothing to train on")
        traj = cat_trajectories([trajs[i] for i in keep])
        graph = None
        if cfg.optim.reuse_rollout_graph:
            graph, traj = traj.outputs, traj.detach()
        r = torch.cat([rewards[i] for i in keep]).to(self.device)
        if self.cfg.log.kl_path or self.algo.needs_reference:
            eps_ref = evaluate_along(self.ref, self.process, traj, chunk=self.cfg.optim.microbatch or 4096)
            kl_rate = kl_increments(self.process, traj.times, traj.outputs, eps_ref, traj.eta, prediction_of(self.policy))
        else:  # not used by the update, not logged: KL_path is NaN in the metrics
            eps_ref = traj.outputs
            kl_rate = torch.full(traj.outputs.shape[:2], float("nan"), device=traj.outputs.device)
        batch = RolloutBatch(traj=traj, rewards=r, eps_ref=eps_ref, kl_rate=kl_rate)
        if graph is not None:
            batch.extras["outputs_graph"] = graph
        return batch

    # ---- one epoch ---------------------------------------------------------------------------------
    def step(self) -> dict:
        """One epoch; the record holds the statistics of the global batch (all processes' trajectories)."""
        dist = self.dist
        counts0 = (self.reward_queries, self.value_reward_queries, self.reward_skipped)
        t0 = time.perf_counter()
        batch = self.collect()
        t_roll = time.perf_counter() - t0
        metrics = self.algo.prepare(batch)
        metrics.update(self.algo.update(batch))
        self.wall_s += time.perf_counter() - t0
        rewards, kl_path = dist.all_gather_cat(batch.rewards), dist.all_gather_cat(batch.kl_path)
        cond = dist.all_gather_any(batch.traj.cond)
        if dist.enabled:
            local = (self.reward_queries, self.value_reward_queries, self.reward_skipped)
            total = dist.all_reduce_int([a - b for a, b in zip(local, counts0, strict=True)])
            self.reward_queries, self.value_reward_queries, self.reward_skipped = (
                b + d for b, d in zip(counts0, total, strict=True))
            metrics = self._merge_metrics(metrics)
        kl = float(kl_path.mean())
        r_mean = float(rewards.mean())
        rec = {"epoch": self.epoch, "reward_mean": r_mean, "reward_std": float(rewards.std()),
               "kl_path": kl, "objective": r_mean - self.cfg.beta * kl, "reward_queries": self.reward_queries,
               "value_reward_queries": self.value_reward_queries, "reward_skipped": self.reward_skipped,
               "wall_s": round(self.wall_s, 3), "rollout_s": round(t_roll, 3), **metrics}
        if isinstance(cond, torch.Tensor) and self.task.num_classes:
            c = cond.to(rewards.device)
            names = self.task.condition_names()
            for k in range(self.task.num_classes):
                m = c == k
                if m.any():
                    rec[f"reward_by_cond/{k if names is None else names[k]}"] = float(rewards[m].mean())
        self.epoch += 1
        return rec

    def _merge_metrics(self, metrics: dict) -> dict:
        """An algorithm's diagnostics over the processes: a value every process agrees on is kept, others are
        averaged over the processes that report them."""
        allm = self.dist.all_gather_object(metrics)
        out = {}
        for k in dict.fromkeys(k for m in allm for k in m):
            vals = [m[k] for m in allm if k in m]
            out[k] = vals[0] if all(v == vals[0] for v in vals) else sum(float(v) for v in vals) / len(vals)
        return out

    def train(self, epochs: int | None = None) -> list[dict]:
        """Run until ``cfg.epochs`` (or ``epochs`` more); returns this call's metric records."""
        cfg = self.cfg
        end = cfg.epochs if epochs is None else self.epoch + epochs
        # the run's last epoch (train(epochs=N) may stop before it), where the algorithm may act (ctrl.certify_z)
        self.end_epoch = max(cfg.epochs, end)
        try:
            return self._train_until(end)
        finally:
            self.end_epoch = None  # also when a run raises: a later update() outside train() certifies nothing

    def _train_until(self, end: int) -> list[dict]:
        """:meth:`train`'s loop, up to epoch ``end``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.epoch < end:
            self.algo.continue_training()
        records = []
        main = self.dist.is_main  # with several processes, process 0 writes every output
        done = self.is_complete()
        if self.out is not None and self.epoch == 0 and main:
            with self._writing("the start-of-run samples"):
                self.save_samples("epoch_00000")
        bar = tqdm(total=end - self.epoch, disable=not (cfg.log.progress and main), desc=f"{cfg.algo}",
                   dynamic_ncols=True)
        while self.epoch < end:
            rec = self.step()
            records.append(rec)
            bar.update(1)
            bar.set_postfix(r=f"{rec['reward_mean']:.3f}", kl=f"{rec['kl_path']:.3f}", J=f"{rec['objective']:.3f}")
            if self.out is not None:
                ckpt = self.epoch % cfg.log.checkpoint_every == 0 or self.epoch == end
                rank_states = self._gather_rank_states() if ckpt and self.dist.enabled else None
                if main:
                    with self._writing(f"the outputs of epoch {rec['epoch']}"):
                        self._write_epoch(rec, end, rank_states)
                if ckpt:
                    self.dist.barrier()  # no process runs ahead of a checkpoint being written
        bar.close()
        if self.out is not None and self.epoch >= cfg.epochs and (records or not done):  # a finished run: no re-run
            if main:
                with self._writing("the final outputs"):
                    self.finish()
            self.dist.barrier()
        if self._trackers is not None:
            self._trackers.close()
        return records

    def is_complete(self) -> bool:
        """The run reached ``epochs`` and wrote its final outputs (reward_curve.png is written last)."""
        return self.out is not None and self.epoch >= self.cfg.epochs and (self.out / "reward_curve.png").exists()

    @contextmanager
    def _writing(self, what: str):
        """A failed write into the run directory (disk full, I/O error) is a one-line CtrlDiffError that names
        the last good checkpoint (checkpoint writes are atomic: a failed one leaves the previous one intact)."""
        try:
            yield
        except OSError as e:
            last = latest_checkpoint(self.out / "checkpoints") if (self.out / "checkpoints").is_dir() else None
            raise CtrlDiffError(f"could not write {what} into {self.out}: {e.strerror or e}; last good checkpoint: "
                                f"{last.name if last else 'none'} (fix that, then --resume)") from None

    def _write_epoch(self, rec: dict, end: int, rank_states: list | None = None) -> None:
        cfg = self.cfg
        append_jsonl(self.out / "metrics.jsonl", rec)
        self.trackers.log_scalars(rec, rec["epoch"])
        if cfg.log.sample_every and self.epoch % cfg.log.sample_every == 0:
            self.save_samples(f"epoch_{self.epoch:05d}")
        if self.epoch % cfg.log.checkpoint_every == 0 or self.epoch == end:
            self.save_checkpoint(rank_states)

    # ---- outputs -----------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_samples(self, model=None, n: int | None = None, seed: int = 1234):
        """Fixed-noise samples for grids (same noise before and after training)."""
        n = n or self.cfg.log.num_eval_samples
        g = torch.Generator(device=self.device).manual_seed(seed)
        cond = self.task.eval_conditions(n)
        cond = None if cond is None else cond.to(self.device)
        x = torch.randn((n, *self.task.sample_shape), generator=g, device=self.device) * self.process.prior_std()
        traj = self.solver(model or self.policy, x, self.times, self.process, cond, generator=g)
        return traj.final

    def save_samples(self, name: str) -> None:
        from ..viz import save_samples_figure

        (self.out / "samples").mkdir(exist_ok=True)
        x = self.task.decode(self.eval_samples())
        nrow = min(self.task.num_classes, 10) or None
        path = save_samples_figure(x, self.out / "samples" / f"{name}.png", nrow=nrow)
        self.trackers.log_image("samples", path, self.epoch)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- d ema + (1 - d) theta after every policy step: one fused update over all trained tensors (a LoRA
        UNet has hundreds of small ones)."""
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.trainable_parameters], 1 - self.cfg.optim.ema_decay)

    @contextmanager
    def final_weights(self):
        """Inside the block the policy holds the weights a run ends with: with ``optim.ema_decay``, the EMA weights
        (the trained ones are put back afterwards), otherwise the trained weights as they are. What the run writes
        out (:meth:`finish`) and what its certification tests (:meth:`Algorithm.certify`) are the same weights."""
        if self.ema is None:
            yield
            return
        raw = [p.detach().clone() for p in self.trainable_parameters]
        copy_into(self.trainable_parameters, self.ema)
        try:
            yield
        finally:
            copy_into(self.trainable_parameters, raw)

    def finish(self) -> None:
        """Write the final model, the before/after figure and the reward curve, of :meth:`final_weights`."""
        with self.final_weights():
            self._finish()

    def _finish(self) -> None:
        from ..viz import plot_curves

        self.before_after()
        self.final_eval()
        meta = {"process": self.process.config(), "fine_tuned_by": self.cfg.algo, "epochs": self.epoch}
        self.task.save_final(self.out, meta)
        recs = read_jsonl(self.out / "metrics.jsonl")
        plot_curves(recs, ["reward_mean", "kl_path", "objective"], self.out / "reward_curve.png",
                    title=f"{self.cfg.algo} on {self.task.name}, reward {self.reward.name}")

    @torch.no_grad()
    def before_after(self, per_condition: int = 4) -> Path:
        """samples/before_after.png (+ .json): the reference's and the tuned model's samples from the same noise,
        one column per condition (up to 10), ``per_condition`` rows each, every sample with its reward.
        Unconditional image models: up to 10 columns; 2-D data: two scatter panels coloured by reward."""
        from ..viz import before_after_figure

        conds = self.task.num_classes
        names = self.task.condition_names() or [str(k) for k in range(conds)]
        ncol = min(conds, 10) or 10
        n = min(self.cfg.log.num_eval_samples, ncol * per_condition) if len(self.task.sample_shape) == 3 else \
            self.cfg.log.num_eval_samples
        cond = self.task.eval_conditions(n)  # the conditions eval_samples uses
        xs, rs = [], []
        for model in (self.ref, self.policy):
            x = self.task.decode(self.eval_samples(model, n=n))
            c = None if cond is None else cond.to(x.device)
            try:
                r = call_reward(self.reward, x, self.task.reward_cond(c), "of the before/after figure").detach()
            except RewardError:
                if self.cfg.reward_errors == "raise":
                    raise
                r = torch.full((n,), float("nan"))
            xs.append(x.float().cpu())
            rs.append(r.float().cpu())
        labels = None if cond is None else [names[int(k)] for k in cond]
        path = before_after_figure(xs[0], xs[1], rs[0], rs[1], self.out / "samples" / "before_after.png",
                                   conditions=labels, reward_name=self.reward.name,
                                   after_label=f"after {self.epoch} epochs of {self.cfg.algo}", max_columns=ncol)
        self.trackers.log_image("before_after", path, self.epoch)
        return path

    def certification_terms(self, model, n: int, refine: int = 1) -> torch.Tensor | None:
        """[n / W, 1 or 2] r - beta KL_path per sample of ``model`` on this process's share of the run's certification
        noise (ctrl.certify_z): n fixed noises drawn from a seed of their own that no rollout or evaluation uses, the
        same draws at every call, so that two models' terms pair up sample by sample. Column 0: the rollout solver and
        its step count; with ``refine`` > 1, column 1: the same solver with ``refine`` times the steps (the
        continuous-time J that the fine-tune must not lose at finer solvers). Counts n / W reward queries per column.
        None where the reward failed on them and ``reward_errors=skip``."""
        from ..eval.evaluate import evaluate_policy

        s, dist = self.cfg.sampler, self.dist
        lo, hi = (n * r // dist.world_size for r in (dist.rank, dist.rank + 1))  # this process's share
        cond = self.task.eval_conditions(n)
        cols = []
        for steps in [s.steps] + ([s.steps * refine] if refine > 1 else []):
            self.count_queries(hi - lo)
            try:
                ev = evaluate_policy(model, self.ref, self.process, self.reward, sample_shape=self.task.sample_shape,
                                     n=hi - lo, solver=s.solver, steps=steps, eta=s.eta,
                                     cond=None if cond is None else cond[lo:hi], beta=self.cfg.beta,
                                     seed=self.process_seed(self.cfg.seed + 1_000_003),
                                     chunk=max(self.cfg.rollout_chunk, 1), decode=self.task.decode,
                                     reward_cond=self.task.reward_cond, device=self.device, return_terms=True)
            except RewardError:
                if self.cfg.reward_errors == "skip":
                    return None
                raise
            cols.append((ev["rewards"] - self.cfg.beta * ev["kl_paths"]).double())
        return torch.stack(cols, 1)

    def final_eval(self) -> dict | None:
        """Score ``log.num_final_eval`` fixed-noise samples of the reference and of the fine-tuned model with the
        rollout solver: E r, KL_path (Girsanov) and J for both -> RUN_DIR/final_eval.json."""
        import json

        from ..eval.evaluate import evaluate_policy

        n = self.cfg.log.num_final_eval
        if not n:
            return None
        s = self.cfg.sampler
        cond = self.task.eval_conditions(n)
        kw = dict(sample_shape=self.task.sample_shape, n=n, solver=s.solver, steps=s.steps, eta=s.eta, cond=cond,
                  beta=self.cfg.beta, seed=4321, chunk=max(self.cfg.rollout_chunk, 1), decode=self.task.decode,
                  reward_cond=self.task.reward_cond, device=self.device)
        res = {"before": evaluate_policy(self.ref, self.ref, self.process, self.reward, **kw),
               "after": evaluate_policy(self.policy, self.ref, self.process, self.reward, **kw),
               "epochs": self.epoch, "reward_queries": self.reward_queries}
        if s.reference_data_end:  # the time at and below which the fine-tune is its reference (the model card says so)
            res["reference_below"] = self.policy.tau
        atomic_write_bytes(self.out / "final_eval.json", json.dumps(res, indent=1).encode())
        return res

    @property
    def trackers(self):
        """The run's experiment trackers (log.trackers), opened on first use by process 0."""
        if self._trackers is None:
            from .trackers import Trackers

            self._trackers = Trackers(self.cfg.log.active_trackers() if self.out is not None else [], self.out or Path("."),
                                      self.cfg.model_dump(mode="json"), self.cfg.log.wandb_project)
        return self._trackers

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "model": self.task.model_state_dict(), "optimizer": self.optimizer.state_dict(),
                "algo": self.algo.state_dict(), "rng": self._rng_state(),
                **({"ema": [e.clone() for e in self.ema]} if self.ema is not None else {}),
                "counters": {"reward_queries": self.reward_queries, "value_reward_queries": self.value_reward_queries,
                             "reward_skipped": self.reward_skipped, "wall_s": self.wall_s}}

    def load_state_dict(self, st: dict) -> None:
        world = st.get("world_size", 1)
        if world != self.dist.world_size:
            raise CtrlDiffError(f"cannot resume: the checkpoint was written by a run of {world} process(es), this "
                                f"one has {self.dist.world_size}; resume with the same number of processes")
        self.epoch = st["epoch"]
        self.task.load_model_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.ema is not None:
            if "ema" not in st or len(st["ema"]) != len(self.ema):
                raise CtrlDiffError("cannot resume: optim.ema_decay is set but the checkpoint holds no EMA weights "
                                    "of these parameters")
            for e, v in zip(self.ema, st["ema"], strict=True):
                e.copy_(v)
        mine = st["rank_states"][self.dist.rank] if self.dist.rank > 0 else None
        self.algo.load_state_dict(st["algo"] if mine is None else mine["algo"])
        self._set_rng_state(st["rng"] if mine is None else mine["rng"])
        for k, v in st["counters"].items():
            setattr(self, k, v)

    def _sync_tensors(self) -> list[torch.Tensor]:
        """What every process must hold identically: every optimizer's parameters and state (the trainable
        weights of the policy and of every network an algorithm trains; frozen weights are the same file)."""
        ts = []
        for opt in self.optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    ts.append(p)
                    ts.extend(v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor))
        return ts

    def _gather_rank_states(self) -> list:
        """Every process's own state for the checkpoint (its RNGs and its algorithm state, e.g. a replay buffer
        of its own samples), after checking that every process holds the same weights (a collective)."""
        mine = {"rng": self._rng_state(), "algo": self.algo.state_dict(),
                "weights_sha256": self.dist.fingerprint(self._sync_tensors())}
        states = self.dist.all_gather_object(mine if self.dist.rank > 0 else {"weights_sha256":
                                                                               mine["weights_sha256"]})
        digests = [s["weights_sha256"] for s in states]
        if len(set(digests)) > 1:
            raise CtrlDiffError(f"processes hold different weights at epoch {self.epoch} (sha256 "
                                f"{', '.join(d[:12] for d in digests)}): multi-process training lost its sync")
        return states

    def save_checkpoint(self, rank_states: list | None = None) -> Path:
        st = self.state_dict()
        if rank_states is not None:  # several processes: process r > 0 resumes from rank_states[r]
            st.update(world_size=len(rank_states), rank_states=rank_states)
        return save_checkpoint(st, self.out / "checkpoints", self.epoch, self.cfg.log.keep_checkpoints)

    def _resume(self) -> None:
        ckpts = self.out / "checkpoints"
        path, state, rejected = load_latest_checkpoint(ckpts, map_location=self.device)
        if rejected:
            msg = f"passed over unreadable checkpoint(s) in {ckpts}: {', '.join(rejected)}"
            if path is None:
                raise CtrlDiffError(f"cannot resume: no readable checkpoint; {msg}. Start again with --overwrite")
            logging.getLogger(__name__).warning("%s; resuming from %s", msg, path.name)
        if state is not None:
            self.load_state_dict(state)
        # else: the run stopped before its first checkpoint. This trainer is in exactly the state of a fresh one
        # (same config, same seed), so resuming replays the run from epoch 0.
        # metrics logged after the checkpoint are replayed by the resumed run: drop them
        if not self.dist.is_main:
            return
        recs = [r for r in read_jsonl(self.out / "metrics.jsonl") if r.get("epoch", -1) < self.epoch]
        import json

        atomic_write_bytes(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())


def runs_reduced_precision(model: torch.nn.Module) -> bool:
    """Whether ``model`` computes in fp16 / bf16: a module of it autocasts (``autocast_dtype`` set, as the
    diffusers backend's denoiser with diffusers.dtype fp16/bf16) or holds half-precision floating weights."""
    half = (torch.float16, torch.bfloat16)
    return any(getattr(m, "autocast_dtype", None) in half for m in model.modules()) or any(
        p.dtype in half for p in model.parameters())


def apply_config_defaults(cfg: TrainConfig, defaults: dict) -> None:
    """Set ``defaults`` ({"section.key": value}) on the config fields the user left unset (a model family's
    own defaults, e.g. fewer eval samples for latent diffusion); explicitly given values are kept."""
    for key, value in defaults.items():
        *path, name = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        if name not in node.model_fields_set:
            setattr(node, name, value)  # validated on assignment
            node.model_fields_set.discard(name)


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    from ..config import apply_overrides

    if not (Path(run_dir) / "config.yaml").is_file():
        raise CtrlDiffError(f"cannot resume: {run_dir} has no config.yaml (not a ctrldiff run directory)")
    data = load_yaml(Path(run_dir) / "config.yaml")
    return build_config(TrainConfig, apply_overrides(data, overrides or []), "config")
