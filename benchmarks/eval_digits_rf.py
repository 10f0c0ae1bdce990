"""Measure the rectified-flow digits model and (with --write) ship it: ``src/ctrldiff/assets/digits_rf.*`` + manifest.

    python benchmarks/eval_digits_rf.py --run runs/digits-rf [--n 1000] [--write]

The model was pretrained by ``ctrldiff pretrain digits --process rf --prediction v`` (flow matching: the UNet predicts
v = eps - x0). Reports, per sampler (the Euler flow ODE ``ode-euler`` = DDIM(eta = 0) on a flow, the exact Gaussian
step ``ddim`` eta = 1, Euler-Maruyama ``em``) and CFG scale: the shipped classifier's accuracy on the requested
labels, the Frechet distance in its feature space to the 300 held-out digits and the diversity, with the same numbers
for the shipped VP digits model (em, 50 steps, CFG 2: its manifest setting) and the real-vs-real baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctrldiff import assets
from ctrldiff.guidance import with_guidance
from ctrldiff.models import load_model
from ctrldiff.noise import process_from_config
from ctrldiff.solvers import sample
from ctrldiff.train.distill import few_step_quality, real_frechet

SETTINGS = [("ode-euler", 10, 2.0, {}), ("ode-euler", 20, 2.0, {}), ("ode-euler", 50, 2.0, {}),
            ("ode-euler", 20, 1.0, {}), ("ddim", 50, 2.0, {"eta": 1.0}), ("em", 50, 2.0, {}), ("em", 100, 2.0, {}),
            ("heun", 10, 2.0, {})]


def quality(model, solver: str, steps: int, guidance: float, n: int, **kw) -> dict:
    process = process_from_config(model.metadata["process"])
    labels = torch.arange(n) % 10
    t0 = time.perf_counter()
    x = sample(with_guidance(model.eval(), guidance), process, (n, 1, 8, 8), steps, solver, cond=labels,
               generator=torch.Generator().manual_seed(0), **kw).final
    q = few_step_quality(None, steps, samples=x.clamp(-1, 1), labels=labels)
    q = {k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}
    return {"solver": solver + (f" eta={kw['eta']:g}" if "eta" in kw else ""), "steps": steps, "guidance": guidance,
            **q, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/digits-rf")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(Path(args.run) / "model")
    rows = []
    for solver, steps, g, kw in SETTINGS:
        rows.append(quality(model, solver, steps, g, args.n, **kw))
        print(json.dumps(rows[-1]), flush=True)
    vp = assets.load_digits_model()
    vp.metadata = vp.metadata or {}
    vp_row = quality(vp, "em", 50, 2.0, args.n)
    real = {k: round(v, 4) for k, v in real_frechet().items()}
    print(json.dumps({"vp_digits_em50_cfg2": vp_row, "real_vs_real": real}))
    if not args.write:
        return
    meta, head = model.metadata, rows[0]
    stem = assets.ship_run(
        args.run, assets.DIGITS_RF, model, "python benchmarks/eval_digits_rf.py --run " + args.run + " --write",
        process=meta["process"], prediction="v (flow velocity eps - x0)",
        quality={
            "conditional_sample_accuracy": head["accuracy"], "samples": args.n, "guidance": head["guidance"],
            "solver": head["solver"], "steps": head["steps"], "seed": 0, "judge": assets.DIGIT_CLASSIFIER,
            "final_loss": meta.get("final_loss"),
            "frechet": "squared Frechet distance in the judge's 128-d feature space to the 300 held-out digits",
            "by_sampler": rows, "vp_digits_em50_cfg2": vp_row, "real_vs_real": real})
    print(f"wrote {stem}.* and the manifest entry {assets.DIGITS_RF!r}")


if __name__ == "__main__":
    main()
