"""LaSRO vs policy-gradient / preference / backprop baselines on the shipped 2-step digits generator.

    python benchmarks/lasro_2step.py                       # default: 3 rewards x available algos, seed 0
    python benchmarks/lasro_2step.py --rewards jpeg-compressibility --algos lasro,ddpo --epochs 20 --seeds 0,1
    python benchmarks/lasro_2step.py --surrogate-curve     # held-out ranking accuracy vs training samples/pairs
    python benchmarks/lasro_2step.py --sweep --seeds 0,1,2 --rewards jpeg-compressibility,digit-correct \
        --algos lasro,lasro-frozen,ddpo,diffusion-dpo      # the tuned comparison (SWEEP; ~13 min per reward)
    python benchmarks/lasro_2step.py --sweep --steps 1 --lr 1e-5 ...  # the same network as a 1-step generator
    python benchmarks/lasro_2step.py --render benchmarks/results/lasro_2step_sweep_jpeg.json   # its tables

Every algorithm runs through the one Trainer with the same true-reward query budget per epoch
(``--queries`` per epoch: LaSRO spends half on the 2-step rollouts and half on their 1-step outputs).
Algorithms: lasro, lasro-frozen (surrogate trained on the first epoch's buffer only, then frozen), ddpo
(DDIM eta = 1 at 2 steps: two stochastic transitions, see ``ddpo_transition_std`` in the results: the
last one's std is sigma_{t_min}-sized, nearly deterministic), and, when registered in ALGORITHMS,
diffusion-dpo and reward-backprop (the latter only on differentiable rewards). Every ``--eval-every``
epochs the deterministic 2-step generator (DDIM eta = 0, the way it is used) is scored on fixed noise;
at the end also its sample quality: the shipped classifier's accuracy, the Frechet distance in that
classifier's feature space to the held-out digits (real-vs-real baseline included) and the diversity.
Results: benchmarks/results/lasro_2step.json (and _surrogate.json for --surrogate-curve).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctrldiff.algorithms import ALGORITHMS
from ctrldiff.rewards.base import call_reward, make_reward
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.distill import few_step_quality, real_frechet
from ctrldiff.train.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_ALGOS = ("lasro", "lasro-frozen", "ddpo", "diffusion-dpo", "reward-backprop")
DEFAULT_REWARDS = ("jpeg-compressibility", "digit-correct", "digit-alignment")
# quality tolerance vs the base generator (stated in the results)
TOL = {"accuracy_drop": 0.05, "frechet_ratio": 1.5, "diversity_ratio": 0.8}
SELECT_SEED, TEST_SEED = 4321, 8765  # fixed evaluation noise: selection set / held-out set
# --sweep: each algorithm's strength knob. LaSRO's regulariser weight c0 at the common lr; the baselines have no
# regulariser (beta = 0, as in DDPO), so their knob is the learning rate (and Diffusion-DPO's temperature).
SWEEP = {
    "lasro": [{"lasro": {"c0": c}} for c in (10.0, 15.0, 20.0)],
    "lasro-frozen": [{"lasro": {"c0": c}} for c in (10.0, 15.0, 20.0)],
    "ddpo": [{"optim": {"lr": lr}} for lr in (5e-6, 1e-5, 2e-5, 3e-5)],
    "diffusion-dpo": [{"optim": {"lr": lr}, "diffusion_dpo": {"beta_dpo": b}} for b in (0.05, 0.5, 5.0)
                      for lr in (5e-6, 1e-5, 2e-5, 3e-5)],
    "reward-backprop": [{"optim": {"lr": lr}} for lr in (1e-6, 3e-6, 1e-5, 3e-5)],
}
# --steps 1 (the same network as a 1-step generator, run with --lr 1e-5): its output from t = 1 is ~1/alpha_1 times
# as sensitive to the network as the 2-step one's, so smaller learning rates, and LaSRO takes 8 generator steps
SWEEP_1STEP = {
    "lasro": [{"lasro": {"c0": c, "gen_steps": 8}} for c in (1.0, 3.0, 10.0)],
    "lasro-frozen": [{"lasro": {"c0": c, "gen_steps": 8}} for c in (1.0, 3.0, 10.0)],
    "ddpo": [{"optim": {"lr": lr}} for lr in (1e-6, 3e-6, 1e-5)],
    "diffusion-dpo": [{"optim": {"lr": lr}, "diffusion_dpo": {"beta_dpo": b}} for b in (0.05, 5.0)
                      for lr in (1e-6, 3e-6, 1e-5)],
    "reward-backprop": [{"optim": {"lr": lr}} for lr in (1e-6, 3e-6, 1e-5)],
}


def deep_merge(base: dict, over: dict | None) -> dict:
    """``base`` with ``over``'s keys replaced, nested dicts merged (a copy)."""
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def algo_config(name: str, reward: str, model: str, epochs: int, queries: int, seed: int, lr: float,
                lasro: dict | None = None, overrides: dict | None = None, steps: int = 2) -> TrainConfig:
    """The run's TrainConfig for the ``steps``-step generator (2, or 1: the same network used as a 1-step
    generator); ``overrides`` (nested dict, e.g. {"optim": {"lr": 1e-5}}) is merged in last."""
    base = dict(model=model, reward=reward, epochs=epochs, seed=seed, beta=0.0,
                log=dict(progress=False, num_final_eval=0, tensorboard=False))
    det = dict(solver="ddim", steps=steps, eta=0.0)
    if name in ("lasro", "lasro-frozen"):  # at 2 steps half the queries score the rollouts' 1-step outputs
        d = dict(algo="lasro", batch_size=queries // 2 if steps == 2 else queries, sampler=det, optim=dict(lr=lr),
                 lasro=dict(freeze_surrogate=name == "lasro-frozen") | (lasro or {}), **base)
        return TrainConfig(**deep_merge(d, overrides))
    if name == "ddpo":
        d = dict(algo="ddpo", batch_size=queries, sampler=dict(solver="ddim", steps=steps, eta=1.0),
                 optim=dict(lr=lr, minibatch=queries // 2, inner_epochs=2), **base)
        return TrainConfig(**deep_merge(d, overrides))
    try:  # the baselines helper's algorithms: the deterministic generator if they accept it, else DDIM eta = 1
        return TrainConfig(**deep_merge(dict(algo=name, batch_size=queries, sampler=det, optim=dict(lr=lr), **base),
                                        overrides))
    except Exception:  # noqa: BLE001 - their validator wants stochastic rollouts
        return TrainConfig(**deep_merge(dict(algo=name, batch_size=queries, sampler=dict(solver="ddim", steps=steps,
                                                                                         eta=1.0),
                                             optim=dict(lr=lr), **base), overrides))


@torch.no_grad()
def evaluate(tr: Trainer, model, n: int, seed: int = SELECT_SEED, quality: bool = False) -> dict:
    """The deterministic k-step generator (DDIM eta = 0, k = 2 and 1) on fixed noise: true reward (+ quality).
    ``seed`` picks the noise set: SELECT_SEED (curves, the final numbers, hyperparameter selection) or TEST_SEED
    (held-out noise: the numbers a tuned comparison reports)."""
    from ctrldiff.solvers import ddim

    g = torch.Generator().manual_seed(seed)
    cond = torch.arange(n) % 10
    x = torch.randn((n, *tr.task.sample_shape), generator=g) * tr.process.prior_std()
    out = {}
    for k in (2, 1):
        z = ddim(model, x, tr.process.time_grid(k), tr.process, cond, eta=0.0).final
        out[f"reward_{k}step"] = float(call_reward(tr.reward, z, cond).mean())
        if quality:
            q = few_step_quality(None, k, samples=z, labels=cond)
            out.update({f"{m}_{k}step": q[m] for m in ("accuracy", "frechet", "diversity")})
    return out


def run_one(name: str, reward: str, args, seed: int, overrides: dict | None = None) -> dict:
    cfg = algo_config(name, reward, args.model, args.epochs, args.queries, seed, args.lr,
                      json.loads(args.lasro) if args.lasro else None, overrides, getattr(args, "steps", 2))
    tr = Trainer(cfg, reward=make_reward(reward))
    t0 = time.perf_counter()
    curve = [{"epoch": 0, "reward_queries": 0, **evaluate(tr, tr.policy, args.eval_n_curve)}]
    records = []
    while tr.epoch < cfg.epochs:
        records += tr.train(epochs=min(args.eval_every, cfg.epochs - tr.epoch))
        curve.append({"epoch": tr.epoch, "reward_queries": tr.reward_queries,
                      **evaluate(tr, tr.policy, args.eval_n_curve)})
    final = evaluate(tr, tr.policy, args.eval_n, quality=True)
    final_test = evaluate(tr, tr.policy, args.eval_n, seed=TEST_SEED, quality=True)
    keep = ("epoch", "reward_queries", "reward_mean", "lasro/surrogate_acc_fresh", "lasro/bt_loss", "lasro/reg",
            "lasro/reg_z1", "lasro/reg_z2", "lasro/surrogate_z2", "lasro/reward_1step", "train/clipfrac",
            "train/ratio_mean")
    return {"algo": name, "reward": reward, "seed": seed, "config_algo": cfg.algo, "sampler": cfg.sampler.model_dump(),
            "batch_size": cfg.batch_size, "lr": cfg.optim.lr, "overrides": overrides or {}, "final": final,
            "final_test": final_test, "curve": curve,
            **({"lasro_config": cfg.lasro.model_dump()} if cfg.algo == "lasro" else {}),
            "train_log": [{k: r[k] for k in keep if k in r} for r in records],
            "wall_s": round(time.perf_counter() - t0, 1), "reward_queries": tr.reward_queries}


def quality_ok(final: dict, base: dict, k: int = 2) -> dict:
    """The k-step generator's quality within TOL of the base generator's (at k steps too)?"""
    return {"accuracy": final[f"accuracy_{k}step"] >= base[f"accuracy_{k}step"] - TOL["accuracy_drop"],
            "frechet": final[f"frechet_{k}step"] <= base[f"frechet_{k}step"] * TOL["frechet_ratio"],
            "diversity": final[f"diversity_{k}step"] >= base[f"diversity_{k}step"] * TOL["diversity_ratio"]}


def ddpo_transition_std(model: str) -> list[float]:
    """Per-step std of DDIM(eta = 1) at 2 steps (the transitions DDPO's likelihood ratios live on)."""
    from ctrldiff.solvers import ddim_coeffs
    from ctrldiff.train.task import build_task

    proc = build_task(model).process
    t = proc.time_grid(2)
    return [ddim_coeffs(proc, t[k], t[k + 1], 1.0)[2] for k in range(2)]


def benchmark(args) -> dict:
    algos = [a for a in args.algos.split(",") if a in ("lasro-frozen",) or a in ALGORITHMS]
    skipped = [a for a in args.algos.split(",") if a not in algos]
    base = {}
    for r in args.rewards.split(","):
        tr = Trainer(algo_config("lasro", r, args.model, 1, 8, 0, args.lr))
        base[r] = evaluate(tr, tr.task.ref, args.eval_n, quality=True)
    res = {"model": args.model, "epochs": args.epochs, "queries_per_epoch": args.queries, "seeds": args.seeds,
           "tolerance": TOL, "real_vs_real": real_frechet(), "base": base, "skipped_algos": skipped,
           "ddpo_transition_std": ddpo_transition_std(args.model), "runs": []}
    for reward in args.rewards.split(","):
        for name in algos:
            if name == "reward-backprop" and not make_reward(reward).differentiable:
                continue
            for seed in (int(s) for s in args.seeds.split(",")):
                run = run_one(name, reward, args, seed)
                run["quality_within_tolerance"] = quality_ok(run["final"], base[reward])
                res["runs"].append(run)
                f = run["final"]
                print(f"{reward:22s} {name:15s} seed {seed}: reward(2-step) {base[reward]['reward_2step']:.4f} -> "
                      f"{f['reward_2step']:.4f}  (1-step {base[reward]['reward_1step']:.4f} -> {f['reward_1step']:.4f})"
                      f"  acc {f['accuracy_2step']:.3f}  FD {f['frechet_2step']:.2f}  div {f['diversity_2step']:.2f}  "
                      f"queries {run['reward_queries']}  {run['wall_s']:.0f}s", flush=True)
                write(res, args.out)
    return res


# ---- the tuned comparison: every algorithm's knob swept, one setting chosen per algorithm ----------------------
def setting_label(overrides: dict) -> str:
    """{"optim": {"lr": 1e-5}, "diffusion_dpo": {"beta_dpo": 0.5}} -> 'lr=1e-05 beta_dpo=0.5'."""
    out = []
    for k, v in overrides.items():
        out += [setting_label(v)] if isinstance(v, dict) else [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"]
    return " ".join(out) or "default"


def select_setting(runs: list[dict], k: int = 2) -> dict:
    """Choose one setting for one algorithm and reward from its runs (every setting x seed): among the settings
    whose every seed is within the quality tolerance on the SELECTION noise set, the highest mean reward of the
    k-step generator there. The chosen setting's numbers are then reported on the held-out TEST noise set. No
    feasible setting: ``chosen`` is None and ``best_infeasible`` names the highest-reward one."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["setting"], []).append(r)
    table = []
    for label, rs in by.items():
        table.append({"setting": label, "seeds": [r["seed"] for r in rs],
                      "feasible": all(all(r["quality_within_tolerance"].values()) for r in rs),
                      "reward_select": sum(r["final"][f"reward_{k}step"] for r in rs) / len(rs)})
    feasible = [t for t in table if t["feasible"]]
    pick = max(feasible, key=lambda t: t["reward_select"]) if feasible else None
    out = {"settings": table, "chosen": None if pick is None else pick["setting"],
           "best_infeasible": None if feasible else max(table, key=lambda t: t["reward_select"])["setting"]}
    label = out["chosen"] or out["best_infeasible"]
    rs = by[label]
    keys = {"reward": f"reward_{k}step", "reward_2step": "reward_2step", "reward_1step": "reward_1step",
            "accuracy": f"accuracy_{k}step", "frechet": f"frechet_{k}step", "diversity": f"diversity_{k}step"}
    out["test"] = {name: [r["final_test"][key] for r in rs] for name, key in keys.items()}
    out["test"]["seeds"] = [r["seed"] for r in rs]
    out["test"]["within_tolerance"] = [all(r["quality_within_tolerance_test"].values()) for r in rs]
    return out


def sweep(args) -> dict:
    """The tuned comparison (``--sweep``): every algorithm x every setting of its knob (SWEEP, or --grid) x every
    seed, then :func:`select_setting` per algorithm and reward."""
    algos = [a for a in args.algos.split(",") if a in ("lasro-frozen",) or a in ALGORITHMS]
    k = getattr(args, "steps", 2)
    grid = (SWEEP if k == 2 else SWEEP_1STEP) | (json.loads(args.grid) if args.grid else {})
    seeds = [int(s) for s in args.seeds.split(",")]
    base = {}
    for r in args.rewards.split(","):
        tr = Trainer(algo_config("lasro", r, args.model, 1, 8, 0, args.lr, steps=k))
        base[r] = {"select": evaluate(tr, tr.task.ref, args.eval_n, quality=True),
                   "test": evaluate(tr, tr.task.ref, args.eval_n, seed=TEST_SEED, quality=True)}
    res = {"mode": "sweep", "model": args.model, "steps": k, "epochs": args.epochs, "queries_per_epoch": args.queries,
           "seeds": seeds, "lr": args.lr, "tolerance": TOL, "eval_seeds": {"select": SELECT_SEED, "test": TEST_SEED},
           "real_vs_real": real_frechet(), "base": base, "grid": {a: grid[a] for a in algos if a in grid},
           "runs": [], "selected": {}}
    t0 = time.perf_counter()
    for reward in args.rewards.split(","):
        res["selected"][reward] = {}
        for name in algos:
            if name == "reward-backprop" and not make_reward(reward).differentiable:
                continue
            runs = []
            for over in grid.get(name, [{}]):
                for seed in seeds:
                    run = run_one(name, reward, args, seed, over)
                    run["setting"] = setting_label(over)
                    run["quality_within_tolerance"] = quality_ok(run["final"], base[reward]["select"], k)
                    run["quality_within_tolerance_test"] = quality_ok(run["final_test"], base[reward]["test"], k)
                    runs.append(run)
                    f = run["final"]
                    print(f"{reward:22s} {name:15s} {run['setting']:28s} seed {seed}: reward({k}-step) "
                          f"{base[reward]['select'][f'reward_{k}step']:.4f} -> {f[f'reward_{k}step']:.4f}  acc "
                          f"{f[f'accuracy_{k}step']:.3f}  FD {f[f'frechet_{k}step']:.2f}  div "
                          f"{f[f'diversity_{k}step']:.2f}  "
                          f"{'ok' if all(run['quality_within_tolerance'].values()) else 'OUT'}  {run['wall_s']:.0f}s",
                          flush=True)
            res["runs"] += runs
            sel = res["selected"][reward][name] = select_setting(runs, k)
            t = sel["test"]
            print(f"==> {reward} {name}: chosen {sel['chosen']!r} (best infeasible {sel['best_infeasible']!r}); "
                  f"held-out reward {sum(t['reward']) / len(seeds):.4f}, within tolerance "
                  f"{sum(t['within_tolerance'])} of {len(seeds)}", flush=True)
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            write(res, args.out)
    return res


def render(paths: list[str], fig_dir: Path) -> str:
    """Markdown tables (and reward-vs-queries plots in ``fig_dir``, named sweep_*.png so that they do not replace the
    suite page's) of saved --sweep results, as in the suite page."""
    import run  # benchmarks/run.py: the suite's renderer

    return "\n".join(run.render_lasro2step(json.loads(Path(p).read_text()), {}, fig_dir, "sweep_") for p in paths)


# ---- surrogate quality: held-out ranking accuracy vs training set size ---------------------------------------
def surrogate_curve(args) -> dict:
    from ctrldiff.algorithms.lasro import LatentSurrogate, ReplayBuffer, bradley_terry_loss, ranking_accuracy
    from ctrldiff.solvers import ddim

    out = {"model": args.model, "rewards": {}}
    for reward in args.curve_rewards.split(","):
        tr = Trainer(algo_config("lasro", reward, args.model, 1, 8, 0, args.lr))
        backbone = tr.algo.surrogate.backbone
        g = torch.Generator().manual_seed(11)
        n_pool = args.pool
        cond = torch.randperm(n_pool, generator=g) % 10
        x = torch.randn((n_pool, 1, 8, 8), generator=g) * tr.process.prior_std()
        with torch.no_grad():  # half 1-step, half 2-step outputs of the base generator (the exploration mix)
            half = n_pool // 2
            z = torch.cat([ddim(tr.task.ref, x[:half], tr.process.time_grid(1), tr.process, cond[:half]).final,
                           ddim(tr.task.ref, x[half:], tr.process.time_grid(2), tr.process, cond[half:]).final])
            r = call_reward(tr.reward, z, cond).float()
        perm = torch.randperm(n_pool, generator=g)
        test, pool = perm[: args.held_out], perm[args.held_out:]
        rows = []
        for n in (int(s) for s in args.sizes.split(",")):
            idx = pool[:n]
            buf = ReplayBuffer(n)
            buf.add(z[idx], cond[idx], r[idx], 0)
            _, n_pairs = ranking_accuracy(r[idx], r[idx], cond[idx])
            torch.manual_seed(0)
            sur = LatentSurrogate(backbone, (1, 8, 8), 10, tr.cfg.lasro.feature_t, tr.cfg.lasro.head_hidden)
            opt = torch.optim.AdamW(sur.head.parameters(), lr=tr.cfg.lasro.surrogate_lr, weight_decay=1e-4)
            gen = torch.Generator().manual_seed(1)
            for _ in range(args.curve_steps):
                w, lo = buf.sample_pairs(tr.cfg.lasro.pairs, gen)
                o = sur(buf.z[torch.cat([w, lo])], buf.cond[torch.cat([w, lo])])
                loss = bradley_terry_loss(o[: len(w)], o[len(w):])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                acc, n_test_pairs = ranking_accuracy(sur(z[test], cond[test]), r[test], cond[test])
            rows.append({"train_samples": n, "train_pairs_available": n_pairs, "held_out_acc": acc,
                         "held_out_pairs": n_test_pairs, "steps": args.curve_steps})
            print(f"{reward:22s} train samples {n:5d} ({n_pairs} ranked pairs): held-out ranking accuracy {acc:.3f} "
                  f"on {n_test_pairs} pairs", flush=True)
        out["rewards"][reward] = rows
    return out


def write(res: dict, path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-2step")
    ap.add_argument("--rewards", default=",".join(DEFAULT_REWARDS))
    ap.add_argument("--algos", default=",".join(DEFAULT_ALGOS))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=2, choices=(1, 2), help="use the generator at 2 steps (shipped) or "
                    "1 step (the same network; DDPO then has one nearly deterministic transition)")
    ap.add_argument("--queries", type=int, default=64, help="true-reward queries per epoch (every algorithm)")
    ap.add_argument("--lr", type=float, default=3e-5, help="policy learning rate (every algorithm)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lasro", default=None, help='JSON overrides of the lasro config, e.g. \'{"c1": 0.0}\'')
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-n-curve", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--surrogate-curve", action="store_true", help="only the surrogate-quality table")
    ap.add_argument("--sweep", action="store_true", help="the tuned comparison: each algorithm's knob swept (SWEEP), "
                    "one setting chosen per algorithm on the selection noise, reported on held-out noise")
    ap.add_argument("--render", nargs="+", metavar="SWEEP_JSON", default=None, help="print the markdown tables of "
                    "saved --sweep results (plots go to docs/benchmarks/)")
    ap.add_argument("--grid", default=None, help='JSON {algo: [overrides, ...]} replacing SWEEP entries, e.g. '
                    '\'{"lasro": [{"lasro": {"c0": 15}}]}\'')
    ap.add_argument("--curve-rewards", default="jpeg-compressibility,digit-correct")
    ap.add_argument("--sizes", default="32,128,512,1536")
    ap.add_argument("--pool", type=int, default=2048)
    ap.add_argument("--held-out", type=int, default=400)
    ap.add_argument("--curve-steps", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.surrogate_curve:
        write(surrogate_curve(args), args.out or str(RESULTS / "lasro_2step_surrogate.json"))
        return
    if args.render:
        print(render(args.render, RESULTS.parent.parent / "docs" / "benchmarks"))
        return
    if args.sweep:
        args.out = args.out or str(RESULTS / "lasro_2step_sweep.json")
        sweep(args)
        return
    args.out = args.out or str(RESULTS / "lasro_2step.json")
    benchmark(args)


if __name__ == "__main__":
    main()
