"""Why Adjoint Matching stops short of the discretisation floor on the 2-D yardstick: train it as the yardstick
does (EM 20, 256 rollouts / epoch, lr 1e-3) and compare the learned score correction with the exact optimal one,
s* - s_ref = grad V / beta (:class:`~ctrldiff.eval.exact2d.OptimalScore`), along paths of the optimal control,
per time step: relative error ||eps_theta - eps*||^2 / ||eps* - eps_ref||^2. Also the per-step KL_path of both.

    python benchmarks/am_diagnose.py --reward mode_switch --budget 50000
"""

from __future__ import annotations

import argparse
import json

import torch
import yardstick2d as y

from ctrldiff.eval.exact2d import OptimalScore, TiltedTarget
from ctrldiff.solvers import euler_maruyama, evaluate_along, kl_increments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reward", default="mode_switch", choices=list(y.REWARDS))
    ap.add_argument("--algo", default="adjoint-matching")
    ap.add_argument("--budget", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = y.run_one(args.reward, args.algo, args.seed, [args.budget], eval_every=10**9, n_eval=2000,
                    return_trainer=True)
    tr = res.pop("trainer")
    make, beta = y.REWARDS[args.reward]
    reward = make()
    gmm = y.gmm_preset("gmm2")
    star = OptimalScore(TiltedTarget(gmm, reward, beta, n_grid=200), tr.process, mass_tol=1e-8)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2000, 2, generator=g) * tr.process.prior_std()
    with torch.no_grad():
        path = euler_maruyama(star, x, tr.times, tr.process, generator=g)
        e_star, e_ref = path.outputs, evaluate_along(tr.ref, tr.process, path)
        e_pol = evaluate_along(tr.policy, tr.process, path)
    rel = ((e_pol - e_star).pow(2).sum(-1).mean(0) / (e_star - e_ref).pow(2).sum(-1).mean(0).clamp(min=1e-12))
    kl_star = kl_increments(tr.process, tr.times, e_star, e_ref).mean(0)
    kl_pol = kl_increments(tr.process, tr.times, e_pol, e_ref).mean(0)
    rows = [{"t": float(tr.times[k]), "rel_err": float(rel[k]), "kl_star_step": float(kl_star[k]),
             "kl_policy_step": float(kl_pol[k])} for k in range(len(rel))]
    last = res["at_budget"][args.budget]
    print(f"{args.algo} on {args.reward}: J {last['objective']:.4f} gap {last['gap']:.4f} (E r {last['reward_mean']:.4f}, "
          f"KL_path {last['kl_path']:.4f})")
    print("| t_k | rel. error of eps_theta vs eps* | KL step (optimal) | KL step (trained, on the optimal paths) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['t']:.3f} | {r['rel_err']:.3f} | {r['kl_star_step']:.4f} | {r['kl_policy_step']:.4f} |")
    if args.out:
        json.dump({"result": res, "per_step": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
