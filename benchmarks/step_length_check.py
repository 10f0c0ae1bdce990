"""Does the held-out test choose the right length for an epoch's step? Its model of the gain against the change in J
measured by sampling.

    python benchmarks/step_length_check.py --out FILE.json [--n 256] -- train --algo ctrl [any ctrldiff train options]

Runs ``ctrldiff train`` (one process) and, after every epoch whose step the held-out test sized
(:meth:`ctrldiff.algorithms.base.Algorithm.accept_update`), measures the change in J = E r - beta KL_path that the
step made, by sampling: the epoch's start, the step as the trust region left it (s = 1: the optimiser's step, cut
back to the trust region) and the step as finally kept (s = the test's choice, after the trust region's check and the
re-estimate of a lengthened step), each from the same n fixed noises (a fresh set per epoch that no rollout uses), at
the training solver on its fixed grid. The held-out test's model of the gain along the step is
gain(s) = s L - s^2 Q (L: first-order gain from the likelihood ratios of the transitions, Q: beta times the quadratic
KL cost; means over the held-out trajectories). Prints, per epoch, s, the model's gain at s = 1 and at s, and the
measured ones (paired differences ± standard error); and, summed over the epochs that were lengthened (s > 1), what
the part beyond s = 1 was predicted to add and what it added. The run's training is unchanged: the measurements put
the weights back exactly and draw no random number from the run's generators.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from ctrldiff.algorithms.base import Algorithm, copy_into, mean_and_se

sys.path.insert(0, str(Path(__file__).resolve().parent))
from held_out_by_step import run_train  # noqa: E402  (benchmarks/, beside this file)


def record(log: list, n: int):
    """Patch the held-out test and the epoch's update to append a row per tested epoch to ``log``. Returns a function
    that takes the patches off."""
    accept, update, terms = Algorithm.accept_update, Algorithm.update, Algorithm.gathered_held_out_terms
    pending: dict = {}

    def accept_update(self, batch, start, held, s_max=1.0):
        pending.update(start=start, one=[p.detach().clone() for p in self.trainer.trainable_parameters], s_max=s_max)
        return accept(self, batch, start, held, s_max=s_max)

    def gathered_held_out_terms(self, batch, held):  # the test's own terms: its first call of the epoch is at s = 1
        lin, quad = terms(self, batch, held)
        if "start" in pending and "L" not in pending:
            (pending["L"], pending["L_se"]), pending["Q"] = mean_and_se(lin), float(quad.mean())
        return lin, quad

    def measured(self, params: list) -> torch.Tensor:
        """[n] r - beta KL_path per sample of the policy at ``params``, on this epoch's fixed noises."""
        from ctrldiff.eval.evaluate import evaluate_policy

        tr, s = self.trainer, self.trainer.cfg.sampler
        copy_into(tr.trainable_parameters, params)
        cond = tr.task.eval_conditions(n)
        ev = evaluate_policy(tr.policy, tr.ref, tr.process, tr.reward, sample_shape=tr.task.sample_shape, n=n,
                             solver=s.solver, steps=s.steps, eta=s.eta, cond=cond, beta=tr.cfg.beta,
                             seed=tr.cfg.seed + 7_000_003 + 1_009 * tr.epoch, chunk=max(tr.cfg.rollout_chunk, 1),
                             decode=tr.task.decode, reward_cond=tr.task.reward_cond, device=tr.device,
                             return_terms=True)
        return (ev["rewards"] - tr.cfg.beta * ev["kl_paths"]).double()

    def update_and_measure(self, batch):
        pending.clear()
        out = update(self, batch)
        if "start" not in pending:
            return out
        tr = self.trainer
        with torch.no_grad():
            kept = [p.detach().clone() for p in tr.trainable_parameters]
            j0, j1, js = measured(self, pending["start"]), measured(self, pending["one"]), measured(self, kept)
            copy_into(tr.trainable_parameters, kept)
        s = float(out.get("train/accepted", 1.0))
        L, Q = pending["L"], pending["Q"]
        d1, d1_se = mean_and_se(j1 - j0)
        ds, ds_se = mean_and_se(js - j0)
        dx, dx_se = mean_and_se(js - j1)
        log.append({"epoch": tr.epoch, "s": s, "s_max": pending["s_max"], "L": L, "L_se": pending["L_se"], "Q": Q,
                    "pred_1": L - Q, "pred_s": s * L - s * s * Q, "meas_1": d1, "meas_1_se": d1_se,
                    "meas_s": ds, "meas_s_se": ds_se, "meas_s_minus_1": dx, "meas_s_minus_1_se": dx_se})
        return out

    Algorithm.accept_update, Algorithm.update = accept_update, update_and_measure
    Algorithm.gathered_held_out_terms = gathered_held_out_terms

    def restore() -> None:
        Algorithm.accept_update, Algorithm.update, Algorithm.gathered_held_out_terms = accept, update, terms

    return restore


def summarise(log: list) -> dict:
    out = {}
    for name, rows in [("lengthened (s > 1)", [r for r in log if r["s"] > 1.0]),
                       ("kept at most whole (0 < s <= 1)", [r for r in log if 0.0 < r["s"] <= 1.0]),
                       ("undone (s = 0)", [r for r in log if r["s"] == 0.0])]:
        if not rows:
            continue
        se = math.sqrt(sum(r["meas_s_minus_1_se"] ** 2 for r in rows))
        se1 = math.sqrt(sum(r["meas_1_se"] ** 2 for r in rows))
        out[name] = {"epochs": len(rows),
                     "pred_beyond_1": sum(r["pred_s"] - r["pred_1"] for r in rows),
                     "meas_beyond_1": sum(r["meas_s_minus_1"] for r in rows), "meas_beyond_1_se": se,
                     "pred_1": sum(r["pred_1"] for r in rows), "meas_1": sum(r["meas_1"] for r in rows),
                     "meas_1_se": se1}
    return out


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("error: usage: python benchmarks/step_length_check.py --out FILE.json [--n 256] -- train [ctrldiff "
                 "train options]")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where the per-epoch measurements and the summary go (JSON)")
    ap.add_argument("--n", type=int, default=256, help="fixed noises per measurement (3 x n samples per epoch)")
    args = ap.parse_args(argv[:cut])
    log: list = []
    record(log, args.n)
    run_train(argv[cut + 1:], log)
    print(f"{'epoch':>5} {'s':>5} {'model(1)':>9} {'meas(1)':>16} {'model(s)':>9} {'meas(s)':>16} {'meas(s)-meas(1)':>18}")
    for r in log:
        print(f"{r['epoch']:>5} {r['s']:5.2f} {r['pred_1']:9.4f} {r['meas_1']:9.4f} ± {r['meas_1_se']:.4f} "
              f"{r['pred_s']:9.4f} {r['meas_s']:9.4f} ± {r['meas_s_se']:.4f} {r['meas_s_minus_1']:9.4f} ± "
              f"{r['meas_s_minus_1_se']:.4f}")
    summary = summarise(log)
    for name, v in summary.items():
        print(f"{name}: {v['epochs']} epochs; beyond s = 1 the model predicted {v['pred_beyond_1']:+.4f}, measured "
              f"{v['meas_beyond_1']:+.4f} ± {v['meas_beyond_1_se']:.4f}; at s = 1 the model {v['pred_1']:+.4f}, "
              f"measured {v['meas_1']:+.4f} ± {v['meas_1_se']:.4f}")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "n": args.n, "summary": summary, "epochs": log}, f)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
