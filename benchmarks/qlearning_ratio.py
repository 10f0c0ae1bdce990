"""Ratio-estimator error vs the exact noised GMM score, as a function of t and of m (METHODS section 3).

For x_t ~ p_t (fresh mixture samples, noised) and s_hat from m data points drawn from a fixed data set of
N = 10,000 mixture samples (the 'scratch-<gmm>' data set), reports
    MSE(t)  = E ||s_hat(t, x_t) - grad log p_t(x_t)||^2          (score units)
    rel(t)  = MSE / E ||grad log p_t||^2
    eps-MSE = sigma_t^2 MSE                                     (eps units: what q-learning's cost weighs)
averaged over fresh subsamples, for m = 1, 16, 256 and all N points (then s_hat is the exact score of the
noised empirical measure, so the remaining error is the empirical-vs-true gap, which dominates at small t).

    python benchmarks/qlearning_ratio.py            # gmm2 and gmm8, default floor
Writes benchmarks/results/qlearning_ratio.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctrldiff.algorithms.ratio import DEFAULT_FLOOR, ratio_score
from ctrldiff.data.toy2d import gmm_preset
from ctrldiff.noise import make_process

TIMES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
MS = (1, 16, 256, None)  # None: all data


def run(preset: str, n_data: int, n_x: int, repeats: int, floor: float) -> list[dict]:
    proc = make_process("vp")
    gmm = gmm_preset(preset)
    gen = torch.Generator().manual_seed(0)
    data = gmm.sample(n_data, gen).double()
    rows = []
    for t in TIMES:
        tt = torch.tensor(t, dtype=torch.float64)
        x, _ = proc.marginal(gmm.sample(n_x, gen).double(), tt, torch.randn(n_x, 2, generator=gen, dtype=torch.float64))
        true = gmm.score(x, t, proc)
        norm2 = float(true.pow(2).sum(1).mean())
        sig2 = float(proc.sigma(tt)) ** 2
        for m in MS:
            errs = []
            for _ in range(1 if m is None else repeats):
                pts = data if m is None else data[torch.randperm(n_data, generator=gen)[:m]]
                errs.append(float((ratio_score(x, t, pts, proc, floor=floor) - true).pow(2).sum(1).mean()))
            mse = sum(errs) / len(errs)
            rows.append({"preset": preset, "t": t, "m": "all" if m is None else m, "mse": mse, "rel": mse / norm2,
                         "eps_mse": sig2 * mse, "true_norm2": norm2})
    return rows


def table(rows: list[dict], key: str) -> str:
    ms = ["1", "16", "256", "all"]
    out = ["| t | " + " | ".join(f"m={m}" for m in ms) + " |", "|---" * (len(ms) + 1) + "|"]
    for t in TIMES:
        vals = {str(r["m"]): r[key] for r in rows if r["t"] == t}
        out.append(f"| {t:g} | " + " | ".join(f"{vals[m]:.3g}" for m in ms) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["gmm2", "gmm8"])
    ap.add_argument("--n-data", type=int, default=10_000)
    ap.add_argument("--n-x", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--floor", type=float, default=DEFAULT_FLOOR)
    ap.add_argument("--out", default="benchmarks/results/qlearning_ratio.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [r for p in args.presets for r in run(p, args.n_data, args.n_x, args.repeats, args.floor)]
    for p in args.presets:
        pr = [r for r in rows if r["preset"] == p]
        print(f"\n### {p}: MSE of s_hat vs the exact noised score (score units), N = {args.n_data}\n")
        print(table(pr, "mse"))
        print(f"\n### {p}: relative MSE (MSE / E||score||^2)\n")
        print(table(pr, "rel"))
        print(f"\n### {p}: eps-units MSE (sigma_t^2 MSE)\n")
        print(table(pr, "eps_mse"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "rows": rows,
                                          "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
