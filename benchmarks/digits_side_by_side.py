"""The main job's budget, side by side: CTRL, DPOK and the strongest current baselines (Adjoint Matching, Flow-GRPO,
Flow-GRPO-Fast, DiffusionNFT) fine-tuning a shipped digits model with the main job's defaults (reward, epochs, batch,
beta, 20 rollout steps), one run each.

    python benchmarks/digits_side_by_side.py --model digits    --out benchmarks/results/digits_side_by_side.json
    python benchmarks/digits_side_by_side.py --model digits-rf --out benchmarks/results/digits_rf_side_by_side.json
    python benchmarks/digits_side_by_side.py --render benchmarks/results/digits_side_by_side.json [...]

Rollouts: the main job's sampler (EM 20) on the VP model; on the rectified-flow model 'digits-rf' the exact Gaussian
step ddim eta = 1 (EM's first step from t_max = 0.999 over-shoots on a flow, see ctrldiff.noise.RectifiedFlow), for
every method alike; Flow-GRPO-Fast runs the eta sampler (eta = 1) with its window of 4 SDE steps. Each final model is
evaluated on 500 fixed noises (seed 4321, the classes 0..9 in turn) at the training solver and at a fine one (em:100
on the VP model, ddim:100 on the flow): E r, KL_path, J = E r - beta KL_path, and the shipped classifier's accuracy;
at the training solver also the Frechet distance in the classifier's feature space to the held-out digits. Beside
each: terminal reward queries (value / gradient calls apart) and training wall-clock. Results are written as each run
ends, so an interrupted run resumes (--resume) where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ctrl_promises as cp  # noqa: E402

from ctrldiff.train.config import TrainConfig  # noqa: E402
from ctrldiff.train.distill import few_step_quality  # noqa: E402
from ctrldiff.train.trainer import Trainer  # noqa: E402

METHODS = {  # name: config overrides on top of the main job's defaults
    "ctrl": dict(algo="ctrl"),
    "dpok": dict(algo="dpok"),
    "adjoint-matching": dict(algo="adjoint-matching"),
    "flow-grpo": dict(algo="flow-grpo"),
    "flow-grpo-fast": dict(algo="flow-grpo", flow_grpo=dict(window=4), sampler=dict(solver="eta", eta=1.0)),
    "diffusion-nft": dict(algo="diffusion-nft"),
}
FLOW_SAMPLER = dict(solver="ddim", eta=1.0)


def run(method: str, model: str, seed: int, epochs: int | None, n: int) -> dict:
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in METHODS[method].items()}
    flow = model.endswith("-rf")
    sampler = {**(FLOW_SAMPLER if flow else {}), **spec.pop("sampler", {})}
    kw = {"epochs": epochs} if epochs else {}
    cfg = TrainConfig(model=model, seed=seed, sampler=sampler, log=cp.QUIET, **kw, **spec)
    tr = Trainer(cfg)
    t0 = time.perf_counter()
    tr.train()
    wall = time.perf_counter() - t0
    s = cfg.sampler
    train_solver = f"{s.solver}:{s.steps}"
    fine = "ddim:100" if flow else "em:100"
    rows, fd = {}, {}
    for solver in (train_solver, fine):
        rows[solver] = {who: cp.evaluate(tr, m, solver, n, samples=solver == train_solver)
                        for who, m in (("ref", tr.ref), ("ft", tr.policy))}
    # Frechet distance and diversity on the training solver's samples
    for who, ev in rows[train_solver].items():
        q = few_step_quality(None, s.steps, samples=ev.pop("samples"), labels=ev.pop("cond"))
        fd[who] = {"frechet": q["frechet"], "diversity": q["diversity"]}
    return {"method": method, "model": model, "seed": seed, "beta": cfg.beta, "reward": str(cfg.reward),
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "train_solver": train_solver, "fine_solver": fine,
            "reward_queries": tr.reward_queries, "value_reward_queries": tr.value_reward_queries, "wall_s": wall,
            "eval": rows, "quality": fd}


def render(paths: list[str]) -> str:
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        runs = data["runs"]
        if not runs:
            continue
        r0 = runs[0]
        tr_s, fine = r0["train_solver"], r0["fine_solver"]
        ref_t, ref_f, q0 = r0["eval"][tr_s]["ref"], r0["eval"][fine]["ref"], r0["quality"]["ref"]
        out.append(f"\n**{r0['model']}**, reward {r0['reward']}, beta {r0['beta']}, {r0['epochs']} epochs of "
                   f"{r0['batch_size']}, seed {r0['seed']}; {data['meta']['n']} fixed noises per evaluation; "
                   f"training solver {tr_s} (Flow-GRPO-Fast: eta:{tr_s.split(':')[1]} with its SDE window)\n")
        out.append(f"| method | E r ({tr_s}) | KL_path | J ({tr_s}) | J ({fine}) | accuracy ({tr_s} / {fine}) | "
                   "FD | reward queries | wall-clock |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        out.append(f"| untouched model | {ref_t['reward_mean']:.3f} | 0 | {ref_t['objective']:.3f} | "
                   f"{ref_f['objective']:.3f} | {ref_t.get('accuracy', float('nan')):.3f} / "
                   f"{ref_f.get('accuracy', float('nan')):.3f} | {q0['frechet']:.2f} | — | — |")
        for r in runs:
            t, f = r["eval"][r["train_solver"]]["ft"], r["eval"][r["fine_solver"]]["ft"]
            value = r.get("value_reward_queries") or 0  # included in reward_queries
            queries = f"{r['reward_queries'] - value}" + (f" (+{value} value)" if value else "")
            out.append(f"| {r['method']} | {t['reward_mean']:.3f} | {t['kl_path']:.2f} | {t['objective']:.3f} | "
                       f"{f['objective']:.3f} | {t.get('accuracy', float('nan')):.3f} / "
                       f"{f.get('accuracy', float('nan')):.3f} | {r['quality']['ft']['frechet']:.2f} | {queries} | "
                       f"{r['wall_s']:.0f} s |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", choices=["digits", "digits-rf"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="default: the main job's")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="skip the methods already in --out")
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", nargs="+", default=None, help="print the tables of saved results and stop")
    args = ap.parse_args()
    if args.render:
        print(render(args.render))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/{args.model.replace('-', '_')}_side_by_side.json")
    data = json.loads(out.read_text()) if args.resume and out.exists() else {"runs": []}
    data["meta"] = {"n": args.n, "threads": args.threads, "torch": torch.__version__}
    done = {r["method"] for r in data["runs"]}
    for m in args.methods:
        if m in done:
            continue
        r = run(m, args.model, args.seed, args.epochs, args.n)
        t, f = r["eval"][r["train_solver"]]["ft"], r["eval"][r["fine_solver"]]["ft"]
        print(f"{m}: J {t['objective']:.3f} ({r['train_solver']}) {f['objective']:.3f} ({r['fine_solver']}), "
              f"KL {t['kl_path']:.2f}, acc {t.get('accuracy', float('nan')):.3f}, {r['wall_s']:.0f} s", flush=True)
        data["runs"].append(r)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
    print(render([str(out)]))


if __name__ == "__main__":
    main()
