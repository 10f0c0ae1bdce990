"""Where along the grid an epoch's update buys its gain, and where it pays its KL: the held-out test's terms per step.

    python benchmarks/held_out_by_step.py --out FILE.json -- train --algo ctrl [any ctrldiff train options]

Runs ``ctrldiff train`` (one process) unchanged and records, at every epoch's held-out test, the per-step terms of the
step as the trust region left it (before the test lengthens or shortens it): l_k, step k's first-order gain in J on
the held-out trajectories (likelihood ratio times Monte Carlo advantage, less beta times the change of its KL to the
reference), and q_k, beta times its quadratic KL cost (:meth:`ctrldiff.algorithms.base.Algorithm.held_out_terms`).
It adds no model evaluation and changes nothing in the run. Prints, per step, both summed over the epochs, the z of
the summed gain, each step's share of the total gain and cost, and the gain per unit of cost: a step with a small
ratio spends the update's KL where it buys little.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from ctrldiff.algorithms.base import Algorithm
from ctrldiff.cli import main as cli_main


def record(log: list) -> None:
    original = Algorithm.held_out_terms

    def terms(self, batch, held, per_step=False):  # the same forward passes, its per-step terms kept once per epoch
        lin, quad = original(self, batch, held, per_step=True)
        epoch = self.trainer.epoch
        if not log or log[-1]["epoch"] != epoch:  # the first test of the epoch: the step before its length is chosen
            log.append({"epoch": epoch, "times": [float(t) for t in batch.traj.times[:lin.shape[1]]],
                        "lin": lin.tolist(), "quad": quad.tolist()})
        return (lin, quad) if per_step else (lin.sum(1), quad.sum(1))

    Algorithm.held_out_terms = terms


def run_train(argv: list[str], log: list) -> None:
    """``ctrldiff train`` with ``argv`` in this process (its patched methods fill ``log``); a one-line error where the
    run made no held-out test."""
    try:
        cli_main.main(argv, prog_name="ctrldiff")
    except SystemExit as e:
        if e.code:
            raise
    if not log:
        sys.exit("error: the run made no held-out test (estimator (a) with ctrl.held_out > 0 makes one every epoch)")


def summarise(log: list) -> list[dict]:
    K = len(log[0]["times"])
    rows = []
    for k in range(K):
        L = V = Q = 0.0
        for e in log:
            col = [r[k] for r in e["lin"]]
            m = sum(col) / len(col)
            L += m
            V += sum((c - m) ** 2 for c in col) / (len(col) - 1) / len(col)
            Q += sum(r[k] for r in e["quad"]) / len(e["quad"])
        rows.append({"k": k, "t": sum(e["times"][k] for e in log) / len(log), "L": L, "z": L / math.sqrt(V) if V else 0.0,
                     "Q": Q})
    Lt, Qt = sum(r["L"] for r in rows), sum(r["Q"] for r in rows)
    for r in rows:
        r.update(L_share=r["L"] / Lt if Lt else 0.0, Q_share=r["Q"] / Qt if Qt else 0.0,
                 L_per_Q=r["L"] / r["Q"] if r["Q"] else 0.0)
    return rows


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("error: usage: python benchmarks/held_out_by_step.py --out FILE.json -- train [ctrldiff train options]")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where the per-epoch, per-step terms and the summary go (JSON)")
    args = ap.parse_args(argv[:cut])
    log: list = []
    record(log)
    run_train(argv[cut + 1:], log)
    rows = summarise(log)
    print(f"held-out terms per step, summed over {len(log)} epochs (L: gain, Q: beta x KL cost, of the step as the "
          "trust region left it)")
    print(f"{'k':>3} {'t':>6} {'L':>9} {'z(L)':>6} {'Q':>9} {'L share':>8} {'Q share':>8} {'L/Q':>8}")
    for r in rows:
        print(f"{r['k']:>3} {r['t']:6.3f} {r['L']:9.4f} {r['z']:6.2f} {r['Q']:9.5f} {r['L_share']:8.1%} "
              f"{r['Q_share']:8.1%} {r['L_per_Q']:8.1f}")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "summary": rows, "epochs": log}, f)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
