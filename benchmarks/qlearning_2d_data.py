"""q-learning from data on the non-Gaussian 2-D data sets 'checkerboard' and 'rings' (METHODS sections 3 and 7).

Data: the 10,000 fixed training samples of 'scratch-checkerboard' / 'scratch-rings'. Methods, at matched terminal
reward queries and matched data passes (as in qlearning_2d.py's 'compare' section):
  q-learning from scratch (J with the Tweedie reward term), 150 epochs x 128 rollouts x 20 EM steps, m = 1024;
  DSM on the same data for the same data passes (1,200 steps x 256, EMA), then DPOK / CTRL(b) with 75 epochs x 256
  rollouts (the same 19,200 terminal reward queries); and the DSM model alone.
Rewards (beta = 0.5): h = mode_switch(2) (mass to the right half plane) on both; --rings-reward ring uses
h = ring(radius 3, width 1) (mass to the outer rings) instead, on which q-learning diverged at epoch 31 (seed 0):
that reward is unbounded, and the critic's Tweedie term beta_q h(x0_hat) at the noise end, where x0_hat =
(y - sigma eps) / alpha_t amplifies the policy's error by 1 / alpha_t ~ 150, gives huge, noisy J differences.

The target p* ∝ p_data exp(h / beta) has no closed form for these data sets. The yardstick is the *empirical
tilted target*: a held-out pool of 20,000 fresh data samples (seed 123, disjoint from the training set) with
self-normalised importance weights w_j ∝ exp(h(x_j) / beta) (its effective sample size 1 / sum w_j^2 is printed).
Against it:
  MMD^2  weighted, unbiased in the samples: mean_{i!=i'} k(x_i, x_i') + sum_{j!=j'} w_j w_j' k(y_j, y_j') / (1 -
         sum w_j^2) - 2 mean_i sum_j w_j k(x_i, y_j); RBF mixture, bandwidths {1/4 .. 4} x the pool's median distance;
  SW_2   sliced Wasserstein-2 over 256 random directions, the pool's projection quantiles taken from its weighted
         empirical CDF;
  floor  the same two numbers for 2,000 points drawn by multinomial resampling from a second, independent pool of
         200,000 data samples with the same weights: what an exact p* sampler would score;
  E_p* h and J* = beta log E_data exp(h / beta) from the 200,000-point pool.
Score error: for the checkerboard the noised data score is exact (uniform squares convolved with a Gaussian:
products of normal-CDF differences), so KL_path is the path KL to the exact data process; for the rings it is the
path KL to the noised empirical measure of the 10,000 training points (no closed form), which memorises at small t.

    python benchmarks/qlearning_2d_data.py --seeds 0 1
Writes benchmarks/results/qlearning_2d_data.json.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from qlearning_2d import dsm, finetune, keep, md, qlearning  # the same runs as the gmm2 benchmark
from torch import Tensor, nn

from ctrldiff.algorithms.ratio import EmpiricalScore
from ctrldiff.data.toy2d import sample_toy2d
from ctrldiff.eval.evaluate import evaluate_policy
from ctrldiff.eval.metrics import median_bandwidth
from ctrldiff.models.base import save_model
from ctrldiff.noise import make_process
from ctrldiff.rewards.toy2d import mode_switch, ring
from ctrldiff.train.task import scratch_task

BETA = 0.5
REWARDS = {"checkerboard": lambda: mode_switch(2.0), "rings": lambda: mode_switch(2.0), "ring": lambda: ring(3.0, 1.0)}


def _log_interval_mass(hi: Tensor, lo: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for hi > lo, stable in both tails (reflect when both are positive)."""
    flip = lo > 0
    h, lo_ = torch.where(flip, -lo, hi), torch.where(flip, -hi, lo)
    lh, ll = torch.special.log_ndtr(h), torch.special.log_ndtr(lo_)
    return lh + torch.log1p(-torch.exp(ll - lh).clamp(max=1 - 1e-300))


class CheckerboardScore(nn.Module):
    """The exact eps = -sigma_t grad log p_t of the noised 'checkerboard' data (uniform on the 8 black unit squares
    of [-2, 2]^2): p_t(x) = (1/8) sum_cells prod_d [Phi((x_d - alpha a_d) / sigma) - Phi((x_d - alpha b_d) / sigma)]
    / alpha, the gradient by autograd in float64."""

    prediction = "eps"

    def __init__(self, process, cells: int = 4, size: float = 4.0):
        super().__init__()
        self.process = process
        c = size / cells
        lo = [(i * c - size / 2, j * c - size / 2) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0]
        self.register_buffer("lo", torch.tensor(lo, dtype=torch.float64))  # [C, 2] lower-left corners
        self.cell = c

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.process.alpha(t.double())[:, None, None]
        s = self.process.sigma(t.double())[:, None, None]
        xd = x.double()[:, None, :]  # [N, 1, 2]
        hi, lo = (xd - a * self.lo) / s, (xd - a * (self.lo + self.cell)) / s
        per_cell = (_log_interval_mass(hi, lo) - torch.log(a * self.cell)).sum(-1)  # [N, C]
        return torch.logsumexp(per_cell, -1) - math.log(self.lo.shape[0])

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        with torch.enable_grad():
            xx = x.detach().double().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(xx, t).sum(), xx)
        return (-self.process.sigma(t.double())[:, None] * g).to(x.dtype)


def _kernel(a: Tensor, b: Tensor, cs: list[float]) -> Tensor:
    d2 = torch.cdist(a, b).pow(2)
    return sum(torch.exp(-c * d2) for c in cs) / len(cs)


class TiltedPool:
    """The empirical tilted target: a weighted pool (module docstring)."""

    def __init__(self, name: str, reward, beta: float, n_pool: int = 20_000, n_big: int = 200_000, n_eval: int = 2000):
        self.y = sample_toy2d(name, n_pool, torch.Generator().manual_seed(123)).double()
        hy = reward(self.y.float()).double()
        self.w = torch.softmax(hy / beta, 0)
        self.ess = float(1 / self.w.pow(2).sum())
        big = sample_toy2d(name, n_big, torch.Generator().manual_seed(456)).double()
        hb = reward(big.float()).double()
        self.E_h_star = float((torch.softmax(hb / beta, 0) * hb).sum())
        self.J_star = float(beta * (torch.logsumexp(hb / beta, 0) - math.log(n_big)))
        self.E_h_data = float(hb.mean())
        m = median_bandwidth(self.y)
        self.cs = [1.0 / (2 * (m * f) ** 2) for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
        kyy = 0.0
        for i in range(0, len(self.y), 250):  # sum_{j != j'} w_j w_j' k(y_j, y_j'), once per target
            kyy += float(self.w[i:i + 250] @ (_kernel(self.y[i:i + 250], self.y, self.cs) @ self.w))
        self.kyy = (kyy - float(self.w.pow(2).sum())) / (1 - float(self.w.pow(2).sum()))
        idx = torch.multinomial(torch.softmax(hb / beta, 0), n_eval, replacement=True,
                                generator=torch.Generator().manual_seed(789))
        self.floor = self.distance(big[idx])
        self.data_dist = self.distance(sample_toy2d(name, n_eval, torch.Generator().manual_seed(790)).double())

    def distance(self, x: Tensor, n_proj: int = 256) -> dict:
        x = x.detach().double()
        n = len(x)
        kxx = (float(_kernel(x, x, self.cs).sum()) - n) / (n * (n - 1))
        kxy = sum(float((_kernel(x[i:i + 250], self.y, self.cs) @ self.w).sum()) for i in range(0, n, 250)) / n
        theta = torch.randn(2, n_proj, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        theta = theta / theta.norm(dim=0, keepdim=True)
        px = (x @ theta).T.sort(1).values  # [P, n]
        py, order = (self.y @ theta).T.sort(1)
        cw = self.w[order].cumsum(1)  # weighted CDF per direction
        levels = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).expand(n_proj, n).contiguous()
        qy = torch.gather(py, 1, torch.searchsorted(cw, levels).clamp(max=py.shape[1] - 1))
        return {"mmd": kxx + self.kyy - 2 * kxy, "sw2": float((px - qy).pow(2).mean().sqrt())}

    def summary(self) -> dict:
        return {"J_star": self.J_star, "E_h_star": self.E_h_star, "E_h_data": self.E_h_data, "ess": self.ess,
                "floor": self.floor, "untilted_data": self.data_dist}


class Ctx:
    """What qlearning_2d's helpers need (proc, reward, data), plus this benchmark's evaluation."""

    def __init__(self, name: str, n_eval: int, n_pool: int = 20_000, reward: str | None = None):
        self.name = name
        self.proc = make_process("vp")
        self.reward = REWARDS[reward or name]()
        self.data = scratch_task(f"scratch-{name}").data
        self.ref = CheckerboardScore(self.proc) if name == "checkerboard" else EmpiricalScore(self.data, self.proc)
        self.target = TiltedPool(name, self.reward, BETA, n_pool=n_pool, n_eval=n_eval)
        self.n_eval = n_eval

    def evaluate(self, model, seed: int = 0) -> dict:
        ev = evaluate_policy(model, self.ref, self.proc, self.reward, sample_shape=(2,), n=self.n_eval, solver="em",
                             steps=20, beta=BETA, seed=10_000 + seed, return_samples=True)
        x = ev.pop("samples")
        ev["gap"] = (self.target.J_star - ev["objective"]) / abs(self.target.J_star)
        ev.update(self.target.distance(x))
        return ev


def run(ctx: Ctx, seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    budget = max(epochs * 128, 256)
    for seed in seeds:
        pol, info = qlearning(ctx, seed, epochs, model=f"scratch-{ctx.name}")
        rows.append({"data": ctx.name, "method": "q-learning (J: tweedie)", "seed": seed, **info,
                     **keep2(ctx.evaluate(pol, seed))})
        print(rows[-1], flush=True)
        pre, pinfo = dsm(ctx, seed, steps=int(info["data_passes"] * len(ctx.data) / 256))
        rows.append({"data": ctx.name, "method": "DSM only (no reward)", "seed": seed, "terminal_queries": 0,
                     "value_queries": 0, **pinfo, **keep2(ctx.evaluate(pre, seed))})
        print(rows[-1], flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "dsm")
            save_model(pre, path, metadata={"process": ctx.proc.config()})
            for algo in ("dpok", "ctrl-b"):
                pol, finfo = finetune(ctx, path, algo, seed, budget)
                finfo["wall_s"] = round(finfo["wall_s"] + pinfo["wall_s"], 1)
                rows.append({"data": ctx.name, "method": f"DSM + {algo}", "seed": seed,
                             "data_passes": pinfo["data_passes"], **finfo, **keep2(ctx.evaluate(pol, seed))})
                print(rows[-1], flush=True)
    return rows


def keep2(ev: dict) -> dict:
    return {**keep(ev), "sw2": ev["sw2"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["checkerboard", "rings"], choices=["checkerboard", "rings"])
    ap.add_argument("--rings-reward", default="mode_switch", choices=["mode_switch", "ring"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=150, help="q-learning epochs (128 trajectories each)")
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--pool", type=int, default=20_000, help="held-out data points of the weighted target")
    ap.add_argument("--out", default="benchmarks/results/qlearning_2d_data.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    results: dict = json.loads(out.read_text()) if out.exists() else {}  # keep the other data set's section
    results["config"] = vars(args)
    cols = ["terminal_queries", "value_queries", "data_passes", "wall_s", "reward_mean", "kl_path", "objective", "gap",
            "mmd", "sw2"]
    for name in args.data:
        t0 = time.perf_counter()
        ctx = Ctx(name, args.n_eval, args.pool, "ring" if name == "rings" and args.rings_reward == "ring" else None)
        s = ctx.target.summary()
        print(f"{name}: J* = {s['J_star']:.4f}, E_p* h = {s['E_h_star']:.4f}, E_data h = {s['E_h_data']:.4f}, pool "
              f"ESS = {s['ess']:.0f} / {args.pool}; exact-p* floor {s['floor']}; untilted data {s['untilted_data']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results[name] = {"target": s, "rows": run(ctx, args.seeds, args.epochs)}
        out.write_text(json.dumps(results, indent=1))
        print(f"\n### {name}\n")
        print(md(results[name]["rows"], cols, ["method"]))
        print(f"| exact p* sample (floor) | - | - | - | - | {s['E_h_star']:.3g} | - | {s['J_star']:.3g} | 0 | "
              f"{s['floor']['mmd']:.3g} | {s['floor']['sw2']:.3g} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
