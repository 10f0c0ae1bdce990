"""q-learning from data on the 2-D yardstick (METHODS sections 3 and 7).

Data: the 10,000 fixed samples of the 'scratch-gmm2' task (gmm2: modes at (-2, 0) and (2, 0), weights 0.7 / 0.3).
Reward h = mode_switch(2) (moves mass to the light right mode), beta = 0.5, i.e. beta_q = 2 / beta = 4; the exact
target is p* ∝ p_data exp(h / beta) (TiltedTarget, by quadrature). Every model is evaluated on 2,000 fresh
samples (EM, 20 steps unless stated): E h, KL_path to the exact data process (Girsanov against the exact mixture
score: the 'score error'), J = E h - beta KL_path, the optimality gap (J* - J) / |J*|, MMD^2 and histogram KL to
exact p* samples.

Sections (each prints a markdown table):
  compare   q-learning from scratch (J with the Tweedie reward term, and J = phi U) vs "pretrain by DSM on the
            same data, then fine-tune with DDPO / DPOK / CTRL(a) / CTRL(b)", at matched terminal reward queries
            and matched data passes (the ratio estimator reads 2 m points per call; DSM reads its batch).
  sm        pure score matching: q-learning with beta_q = 0 vs DSM for the same wall-clock time.
  solvers   q-learning (reward-directed) trained and evaluated with the SDE (EM) and the probability-flow ODE
            (ode-euler) at 5, 10 and 50 steps.
  solvers-sm  the same in score-matching mode (beta_q = 0): KL_path and MMD^2 to the data distribution, plus the
            same models sampled with EM at 50 steps.

    python benchmarks/qlearning_2d.py                    # all sections, 1 seed
    python benchmarks/qlearning_2d.py --sections compare --seeds 0 1
    python benchmarks/qlearning_2d.py --sections solvers-sm --seeds 0 1 --out benchmarks/results/qlearning_2d_solvers_sm.json
Writes benchmarks/results/qlearning_2d.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from ctrldiff.data.toy2d import gmm_preset
from ctrldiff.eval.evaluate import evaluate_policy
from ctrldiff.eval.exact2d import TiltedTarget
from ctrldiff.models.base import save_model
from ctrldiff.models.mlp import ExactGMMScore, MLPScoreModel
from ctrldiff.noise import make_process
from ctrldiff.rewards.toy2d import mode_switch
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.pretrain import dsm_loss
from ctrldiff.train.task import scratch_task
from ctrldiff.train.trainer import Trainer

BETA = 0.5
LOG = dict(progress=False, tensorboard=False, num_final_eval=0)
FINETUNE = {
    "ddpo": dict(algo="ddpo"),
    "dpok": dict(algo="dpok"),
    "ctrl-a": dict(algo="ctrl", ctrl=dict(estimator="a", value=dict(reward_term="surrogate", epochs=4))),
    "ctrl-b": dict(algo="ctrl", ctrl=dict(estimator="b", value=dict(reward_term="surrogate", epochs=4))),
}


class Ctx:
    def __init__(self, n_eval: int):
        self.proc = make_process("vp")
        self.gmm = gmm_preset("gmm2")
        self.reward = mode_switch(2.0)
        self.target = TiltedTarget(self.gmm, self.reward, BETA)
        self.exact = ExactGMMScore(self.gmm, self.proc, None)
        self.data = scratch_task("scratch-gmm2").data
        self.n_eval = n_eval

    def evaluate(self, model, solver: str = "em", steps: int = 20, seed: int = 0, tilted: bool = True) -> dict:
        ev = evaluate_policy(model, self.exact, self.proc, self.reward, sample_shape=(2,), n=self.n_eval,
                             solver=solver, steps=steps, beta=BETA, seed=10_000 + seed, return_samples=True)
        x = ev.pop("samples")
        ev["gap"] = (self.target.J_star - ev["objective"]) / abs(self.target.J_star)
        if tilted:
            ev.update(self.target.sample_distance(x, n_ref=self.n_eval))
        else:  # distance to the data distribution itself
            from ctrldiff.eval.metrics import mmd

            ref = self.gmm.sample(self.n_eval, torch.Generator().manual_seed(99)).double()
            ev["mmd_data"] = mmd(x.double(), ref, [0.25, 0.5, 1.0, 2.0, 4.0])
        ev["frac_right"] = float((x[:, 0] > 0).float().mean())
        return ev


def qlearning(ctx: Ctx, seed: int, epochs: int, batch: int = 128, steps: int = 20, solver: str = "em",
              beta_q: float | None = None, reward_term: str = "tweedie", lr: float = 2e-3, m: int = 1024,
              model: str = "scratch-gmm2") -> tuple:
    cfg = TrainConfig(algo="q-learning", model=model, beta=BETA, epochs=epochs, batch_size=batch, seed=seed,
                      sampler=dict(solver=solver, steps=steps), optim=dict(lr=lr, minibatch=512), log=LOG,
                      qlearning=dict(beta_q=beta_q, m=m, critic=dict(reward_term=reward_term)))
    tr = Trainer(cfg, reward=ctx.reward)
    t0 = time.perf_counter()
    tr.train()
    wall = time.perf_counter() - t0
    calls = math.ceil(batch * steps / 4096) * epochs
    info = {"wall_s": round(wall, 1), "terminal_queries": tr.reward_queries - tr.value_reward_queries,
            "value_queries": tr.value_reward_queries, "data_passes": round(calls * 2 * m / len(ctx.data), 2)}
    return tr.policy, info


def dsm(ctx: Ctx, seed: int, steps: int | None = None, wall_s: float | None = None, batch: int = 256,
        lr: float = 2e-3) -> tuple:
    """DSM on the fixed data set (eps-prediction MLP of the same size, AdamW, EMA weights returned)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLPScoreModel(dim=2, hidden=128, depth=3)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n, step, t0 = len(ctx.data), 0, time.perf_counter()
    while (steps is not None and step < steps) or (wall_s is not None and time.perf_counter() - t0 < wall_s):
        x0 = ctx.data[torch.randint(0, n, (batch,), generator=gen)]
        loss = dsm_loss(model, ctx.proc, x0, None, 1e-3, 0.0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
    return ema.eval(), {"steps": step, "wall_s": round(time.perf_counter() - t0, 1),
                        "data_passes": round(step * batch / n, 2)}


def finetune(ctx: Ctx, pre_path: str, algo: str, seed: int, budget: int, batch: int = 256) -> tuple:
    cfg = TrainConfig(model=pre_path, beta=BETA, epochs=budget // batch, batch_size=batch, seed=seed,
                      sampler=dict(solver="em", steps=20), optim=dict(lr=1e-3, minibatch=512), log=LOG,
                      **FINETUNE[algo])
    tr = Trainer(cfg, reward=ctx.reward)
    t0 = time.perf_counter()
    tr.train()
    return tr.policy, {"wall_s": round(time.perf_counter() - t0, 1),
                       "terminal_queries": tr.reward_queries - tr.value_reward_queries,
                       "value_queries": tr.value_reward_queries}


def keep(ev: dict) -> dict:
    keys = ("reward_mean", "kl_path", "objective", "gap", "mmd", "hist_kl", "frac_right", "mmd_data")
    return {k: ev[k] for k in keys if k in ev}


def section_compare(ctx: Ctx, seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    budget = epochs * 128  # terminal queries of the q-learning runs
    for seed in seeds:
        for rt in ("tweedie", "none"):
            pol, info = qlearning(ctx, seed, epochs, reward_term=rt)
            rows.append({"method": f"q-learning (J: {rt})", "seed": seed, **info, **keep(ctx.evaluate(pol, seed=seed))})
            print(rows[-1], flush=True)
        dsm_steps = int(rows[-1]["data_passes"] * len(ctx.data) / 256)  # the same data passes as q-learning
        pre, pinfo = dsm(ctx, seed, steps=dsm_steps)
        ev = ctx.evaluate(pre, seed=seed)
        rows.append({"method": "DSM pretrain only", "seed": seed, "terminal_queries": 0, "value_queries": 0, **pinfo,
                     **keep(ev)})
        print(rows[-1], flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "dsm")
            save_model(pre, path, metadata={"process": ctx.proc.config()})
            for algo in FINETUNE:
                pol, info = finetune(ctx, path, algo, seed, budget)
                info["wall_s"] = round(info["wall_s"] + pinfo["wall_s"], 1)
                rows.append({"method": f"DSM + {algo}", "seed": seed, "data_passes": pinfo["data_passes"], **info,
                             **keep(ctx.evaluate(pol, seed=seed))})
                print(rows[-1], flush=True)
    return rows


def section_sm(ctx: Ctx, seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    for seed in seeds:
        pol, info = qlearning(ctx, seed, epochs, beta_q=0.0)
        rows.append({"method": "q-learning beta_q=0", "seed": seed, **info,
                     **keep(ctx.evaluate(pol, seed=seed, tilted=False))})
        print(rows[-1], flush=True)
        pre, pinfo = dsm(ctx, seed, wall_s=info["wall_s"])
        rows.append({"method": "DSM (same wall time)", "seed": seed, **pinfo,
                     **keep(ctx.evaluate(pre, seed=seed, tilted=False))})
        print(rows[-1], flush=True)
    return rows


def section_solvers(ctx: Ctx, seeds: list[int], epochs: int, beta_q: float | None = None) -> list[dict]:
    """beta_q None: reward mode (beta_q = 2 / beta, distances to p*); 0: score-matching mode (to the data)."""
    rows, tilted = [], beta_q != 0
    for seed in seeds:
        for solver in ("em", "ode-euler"):
            for steps in (5, 10, 50):
                pol, info = qlearning(ctx, seed, epochs, solver=solver, steps=steps, beta_q=beta_q)
                ev = ctx.evaluate(pol, solver=solver, steps=steps, seed=seed, tilted=tilted)
                ev_em = ctx.evaluate(pol, solver="em", steps=50, seed=seed, tilted=tilted)
                rows.append({"method": f"q-learning {solver}", "steps": steps, "seed": seed, **info, **keep(ev),
                             "em50": keep(ev_em)})
                print(rows[-1], flush=True)
    return rows


def md(rows: list[dict], cols: list[str], first: list[str]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(c) for c in first), []).append(r)
    out = ["| " + " | ".join(first + cols) + " |", "|---" * (len(first) + len(cols)) + "|"]
    for key, rs in groups.items():
        cells = []
        for c in cols:
            v = [r[c] for r in rs if c in r and r[c] is not None]
            if not v:
                cells.append("-")
                continue
            mean = sum(v) / len(v)
            sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else None
            fmt = (lambda x: f"{x:.0f}") if c in ("terminal_queries", "value_queries", "steps") else (lambda x: f"{x:.3g}")
            cells.append(fmt(mean) + (f" ± {fmt(sd)}" if sd is not None else ""))
        out.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["compare", "sm", "solvers", "solvers-sm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=150, help="q-learning epochs (128 trajectories each)")
    ap.add_argument("--solver-epochs", type=int, default=100)
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/qlearning_2d.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = Ctx(args.n_eval)
    print(f"target: J* = {ctx.target.J_star:.4f}, E_p* h = {ctx.target.mean_reward_star:.4f}, "
          f"E_data h = {ctx.target.mean_reward_ref:.4f}, KL(p*||p_data) = {ctx.target.kl_star:.4f}")
    results = {"config": vars(args), "target": ctx.target.summary()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["terminal_queries", "value_queries", "data_passes", "wall_s", "reward_mean", "kl_path", "objective", "gap",
            "mmd", "hist_kl", "frac_right"]
    if "compare" in args.sections:
        results["compare"] = section_compare(ctx, args.seeds, args.epochs)
        out.write_text(json.dumps(results, indent=1))
        print("\n### from data: q-learning vs DSM pretraining + fine-tuning (matched terminal queries, data passes)\n")
        print(md(results["compare"], cols, ["method"]))
    if "sm" in args.sections:
        results["sm"] = section_sm(ctx, args.seeds, args.epochs)
        out.write_text(json.dumps(results, indent=1))
        print("\n### pure score matching: q-learning (beta_q = 0) vs DSM at equal wall time\n")
        print(md(results["sm"], ["wall_s", "data_passes", "kl_path", "mmd_data", "frac_right"], ["method"]))
    if "solvers" in args.sections:
        results["solvers"] = section_solvers(ctx, args.seeds, args.solver_epochs)
        out.write_text(json.dumps(results, indent=1))
        print("\n### SDE vs probability-flow ODE dynamics (trained and evaluated with the same solver / steps)\n")
        print(md(results["solvers"], ["wall_s", "reward_mean", "kl_path", "objective", "mmd", "frac_right"],
                 ["method", "steps"]))
    if "solvers-sm" in args.sections:
        results["solvers_sm"] = section_solvers(ctx, args.seeds, args.solver_epochs, beta_q=0.0)
        out.write_text(json.dumps(results, indent=1))
        print("\n### score-matching mode (beta_q = 0): SDE vs probability-flow ODE, trained and evaluated alike\n")
        for r in results["solvers_sm"]:
            r["em50_kl_path"], r["em50_mmd_data"] = r["em50"]["kl_path"], r["em50"]["mmd_data"]
        print(md(results["solvers_sm"], ["wall_s", "kl_path", "mmd_data", "frac_right", "em50_kl_path",
                                         "em50_mmd_data"], ["method", "steps"]))
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
