"""The benchmark suite: one command reproduces, in miniature, the comparisons of the source documents at matched
reward-query budgets, with several seeds, and writes docs/BENCHMARKS.md (tables and plots).

    python benchmarks/run.py --quick            # about 30 min on 2 CPU cores (27 min measured)
    python benchmarks/run.py                    # full mode (its time is stated in the page it writes)
    python benchmarks/run.py --quick --check benchmarks/results/suite_quick.json   # rerun and compare

Sections (each one reuses the benchmark script that owns it, so a number here is the same computation as there):
  ctrl        CTRL's two promises (benchmarks/ctrl_promises.py): the default main job evaluated at its training solver
              and at finer ones beside the untouched model, and J >= J_ref against DPOK on several rewards and scales.
  finetune2d  CTRL(a), CTRL(b) vs DDPO, DPOK (and reward backprop / Diffusion-DPO where registered) on the exact
              2-D yardstick (benchmarks/yardstick2d.py): sample efficiency (E r, KL_path, J, gap to J*, MMD to p*
              at each budget) and robustness: each fine-tuned score evaluated with other solvers / step counts
              (benchmarks/robustness.py's list).
  baselines   Adjoint Matching, Flow-GRPO (-Fast) and DiffusionNFT on the same yardstick, with its discretisation floor.
  flow2d      every method on the rectified-flow yardstick 'gmm2-rf-exact' (ddim eta 1), with its floor.
  digits      the digits main job side by side on the shipped VP and rectified-flow models: CTRL, DPOK, Adjoint
              Matching, Flow-GRPO (-Fast), DiffusionNFT (benchmarks/digits_side_by_side.py).
  qlearning2d q-learning from data and a reward (no pretrained score) vs "pretrain by denoising score matching,
              then fine-tune with DPOK / CTRL / DDPO" at matched terminal reward queries and data passes
              (benchmarks/qlearning_2d.py).
  lasro2step  LaSRO vs DDPO / Diffusion-DPO (and reward backprop) on the shipped 2-step digits generator, at 2 and
              at 1 step, each baseline tuned (benchmarks/lasro_2step.py --sweep), where that benchmark is available.
Training and evaluation are seeded and run with a fixed thread count, so a rerun on the same machine reproduces
every non-timing number; ``--check OLD.json`` reruns and reports, cell by cell, whether each number lies within
the spread (seed std) that the old page states.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MODES = {
    # finetune2d: rewards, budgets (reward queries), seeds, eval samples, robustness solvers
    # qlearning2d: q-learning epochs (128 trajectories each), seeds, fine-tuning baselines
    "smoke": dict(rewards=["mode_switch"], budgets=[256, 512], seeds=[0, 1], n_eval=200,
                  robust=[("em", 5), ("em", 20), ("ddim", 10)], ql_epochs=2, ql_seeds=[0], ql_algos=["dpok"],
                  lasro=False, algos=["ctrl-a", "ddpo"], bl_algos=["adjoint-matching", "diffusion-nft"], bl_seeds=[0],
                  flow=dict(rewards=["mode_switch"], budgets=[256, 512], seeds=[0], algos=["ctrl-a", "dpok"]),
                  digits=None),
    "quick": dict(rewards=["mode_switch"], budgets=[2560, 5120], seeds=[0, 1], n_eval=1000,
                  robust=[("em", 5), ("em", 20), ("em", 100), ("ddim", 50), ("heun", 25), ("dpmpp-2m", 20)],
                  ql_epochs=60, ql_seeds=[0, 1], ql_algos=["dpok", "ctrl-a"], lasro=True,
                  algos=["ctrl-a", "ctrl-b", "ddpo", "dpok", "reward-backprop", "diffusion-dpo"],
                  bl_algos=["adjoint-matching", "flow-grpo", "flow-grpo-fast", "diffusion-nft", "diffusion-nft-kl1"],
                  bl_seeds=[0],
                  flow=dict(rewards=["mode_switch"], budgets=[2560, 5120], seeds=[0],
                            algos=["ctrl-a", "ctrl-b", "dpok", "adjoint-matching", "flow-grpo", "diffusion-nft-kl1"]),
                  digits=dict(models=["digits", "digits-rf"], epochs=3, n=200,
                              methods=["ctrl", "dpok", "adjoint-matching", "flow-grpo", "diffusion-nft"])),
    "full": dict(rewards=["quadratic", "mode_switch"], budgets=[5000, 20000, 50000], seeds=[0, 1, 2], n_eval=2000,
                 robust=None, ql_epochs=150, ql_seeds=[0, 1, 2], ql_algos=["ddpo", "dpok", "ctrl-a", "ctrl-b"],
                 lasro=True, algos=None, bl_algos=None, bl_seeds=[0, 1, 2],
                 flow=dict(rewards=["quadratic", "mode_switch"], budgets=[5000, 20000], seeds=[0],
                           algos=["ctrl-a", "ctrl-b", "ddpo", "dpok", "reward-backprop", "diffusion-dpo",
                                  "adjoint-matching", "flow-grpo", "flow-grpo-fast", "diffusion-nft-kl1"]),
                 digits=dict(models=["digits", "digits-rf"], epochs=None, n=500, methods=None)),
}


# ---- small helpers ------------------------------------------------------------------------------------------
def mean_sd(vals: list[float]) -> tuple[float, float | None]:
    vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def cell(vals: list[float], fmt: str = "{:.3f}") -> str:
    m, sd = mean_sd(vals)
    if math.isnan(m):
        return "—"
    return fmt.format(m) + (f" ± {fmt.format(sd)}" if sd is not None else "")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "gpu": torch.cuda.is_available(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "commit": commit}


# ---- section: CTRL vs baselines on the exact 2-D yardstick -------------------------------------------------
def _algos_2d(mode: dict) -> list[str]:
    """The yardstick's algorithms whose update rule is registered (baselines that landed later included)."""
    import yardstick2d

    from ctrldiff.algorithms import ALGORITHMS

    names = [a for a, spec in yardstick2d.ALGOS.items() if spec["algo"] in ALGORITHMS]
    if mode["algos"] is None:  # full mode: every baseline but the newest, which have their own section
        return [a for a in names if a not in yardstick2d.NEW_ALGOS + yardstick2d.VARIANTS]
    return [a for a in names if a in mode["algos"]]


def section_finetune2d(mode: dict) -> dict:
    import robustness
    import yardstick2d

    from ctrldiff.data.toy2d import gmm_preset
    from ctrldiff.eval.evaluate import evaluate_policy

    solvers = mode["robust"] or [(s, n) for s, n, _ in robustness.EVALS]
    runs = []
    for rname in mode["rewards"]:
        for algo in _algos_2d(mode):
            for seed in mode["seeds"]:
                res = yardstick2d.run_one(rname, algo, seed, mode["budgets"], eval_every=5, n_eval=mode["n_eval"],
                                          return_trainer=True)
                tr = res.pop("trainer")
                res["robust"] = {}
                for solver, steps in solvers:
                    ev = evaluate_policy(tr.policy, tr.ref, tr.process, tr.reward, sample_shape=(2,),
                                         n=mode["n_eval"], solver=solver, steps=steps, beta=res["beta"],
                                         seed=777 + seed)
                    res["robust"][f"{solver}:{steps}"] = ev["objective"]
                last = res["at_budget"][max(mode["budgets"])]
                print(f"  finetune2d {rname} {algo} seed {seed}: J {last['objective']:.4f} gap {last['gap']:.3f} "
                      f"({res['wall_s']:.0f} s)", flush=True)
                runs.append(res)
    # the reference model under each solver (the same for every algorithm)
    ref = {}
    for rname in mode["rewards"]:
        make, beta = yardstick2d.REWARDS[rname]
        reward = make()
        ref[rname] = {}
        for solver, steps in solvers:
            ev = evaluate_policy(tr.ref, tr.ref, tr.process, reward, sample_shape=(2,), n=mode["n_eval"],
                                 solver=solver, steps=steps, beta=beta, seed=777)
            ref[rname][f"{solver}:{steps}"] = ev["objective"]
    # the exact optimal control under each solver: what the continuous-time optimum itself scores there
    optimal = {rname: {f"{r['solver']}:{r['steps']}": r["objective"] for r in robustness.optimal_rows(
        gmm_preset("gmm2"), yardstick2d.REWARDS[rname][0](), yardstick2d.REWARDS[rname][1], tr.process, tr.ref,
        mode["n_eval"], [(s, n, 0.0) for s, n in solvers])} for rname in mode["rewards"]}
    return {"runs": runs, "reference": ref, "optimal": optimal, "solvers": [f"{s}:{n}" for s, n in solvers]}


def render_finetune2d(data: dict, mode: dict, fig_dir: Path, prefix: str = "finetune2d") -> str:
    runs = data["runs"]
    out = []
    budgets = mode["budgets"]
    for rname in mode["rewards"]:
        rs = [r for r in runs if r["reward"] == rname]
        if not rs:
            continue
        algos = list(dict.fromkeys(r["algo"] for r in rs))
        out.append(f"\n### reward `{rname}` (beta = {rs[0]['beta']}, J* = {rs[0]['J_star']:.4f}, "
                   f"J_ref = {rs[0]['J_ref']:.4f})\n")
        out.append("Sample efficiency: evaluated at each reward-query budget on fresh samples (EM 20 steps, the "
                   "training solver); mean ± std over seeds.\n")
        rows = []
        for algo in algos:
            ra = [r for r in rs if r["algo"] == algo]
            for b in budgets:
                evs = [r["at_budget"][str(b)] if str(b) in r["at_budget"] else r["at_budget"][b] for r in ra]
                rows.append([algo, b] + [cell([e[k] for e in evs]) for k in
                                         ("reward_mean", "kl_path", "objective", "gap", "mmd")])
        out.append(md_table(["algo", "queries", "E r", "KL_path", "J", "gap (J*−J)/|J*|", "MMD² to p*"], rows))
        out.append("\nRobustness: J of the score fine-tuned with EM-20 (at the last budget), evaluated with other "
                   "solvers / step counts (KL_path by Girsanov along each solver's paths; with deterministic solvers "
                   "J can exceed J*, see `ctrldiff eval --help`). The exact optimal control is the continuous-time "
                   "optimum sampled the same way: a fine-tune that has learned it scores as that row does, "
                   "at the coarse grids too.\n")
        sol = data["solvers"]
        rows = [["reference"] + [f"{data['reference'][rname][s]:.3f}" for s in sol]]
        if rname in data.get("optimal", {}):
            rows.append(["exact optimal control"] + [f"{data['optimal'][rname][s]:.3f}" for s in sol])
        for algo in algos:
            ra = [r for r in rs if r["algo"] == algo]
            rows.append([algo] + [cell([r["robust"][s] for r in ra]) for s in sol])
        out.append(md_table(["algo"] + [s.replace(":", " ") for s in sol], rows))
        fig = _plot_curves(rs, algos, fig_dir / f"{prefix}_{rname}.png",
                           f"exact 2-D yardstick, reward {rname}: J vs reward queries (J* dashed)")
        if fig:
            out.append(f"\n![J vs reward queries, {rname}](benchmarks/{fig.name})")
    return "\n".join(out)


def _new_figure(path: Path):
    """(pyplot, figure, axes) for a plot to be saved at ``path``, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    return plt, fig, ax


def _save_figure(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_curves(rs: list[dict], algos: list[str], path: Path, title: str) -> Path | None:
    made = _new_figure(path)
    if made is None:
        return None
    plt, fig, ax = made
    for algo in algos:
        ra = [r for r in rs if r["algo"] == algo]
        n = min(len(r["curve"]) for r in ra)
        q = [ra[0]["curve"][i]["queries"] for i in range(n)]
        js = [[r["curve"][i]["objective"] for r in ra] for i in range(n)]
        m = [statistics.mean(j) for j in js]
        ax.plot(q, m, label=algo)
        if len(ra) > 1:
            sd = [statistics.stdev(j) for j in js]
            ax.fill_between(q, [a - b for a, b in zip(m, sd, strict=True)], [a + b for a, b in zip(m, sd, strict=True)],
                            alpha=0.2)
    ax.axhline(rs[0]["J_star"], ls="--", c="k", lw=1)
    lo = min(rs[0]["J_ref"], rs[0]["J_star"]) - abs(rs[0]["J_star"]) * 0.6
    ax.set_ylim(lo, rs[0]["J_star"] + abs(rs[0]["J_star"]) * 0.15)
    return _save_figure(plt, fig, ax, path, "reward queries", "J = E r − β KL_path", title, 8)


# ---- section: q-learning from data vs pretrain + fine-tune -------------------------------------------------
def section_qlearning2d(mode: dict) -> dict:
    import qlearning_2d as Q

    from ctrldiff.models.base import save_model

    ctx = Q.Ctx(mode["n_eval"])
    rows = []
    epochs = mode["ql_epochs"]
    for seed in mode["ql_seeds"]:
        pol, info = Q.qlearning(ctx, seed, epochs)
        rows.append({"method": "q-learning (from data, no pretrained score)", "seed": seed, **info,
                     **Q.keep(ctx.evaluate(pol, seed=seed))})
        budget = info["terminal_queries"]
        dsm_steps = max(1, int(info["data_passes"] * len(ctx.data) / 256))  # the same data passes
        pre, pinfo = Q.dsm(ctx, seed, steps=dsm_steps)
        rows.append({"method": "DSM pretrain only", "seed": seed, "terminal_queries": 0, "value_queries": 0, **pinfo,
                     **Q.keep(ctx.evaluate(pre, seed=seed))})
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "dsm")
            save_model(pre, path, metadata={"process": ctx.proc.config()})
            for algo in mode["ql_algos"]:
                pol, finfo = Q.finetune(ctx, path, algo, seed, budget)
                finfo["wall_s"] = round(finfo["wall_s"] + pinfo["wall_s"], 1)
                rows.append({"method": f"DSM + {algo}", "seed": seed, "data_passes": pinfo["data_passes"], **finfo,
                             **Q.keep(ctx.evaluate(pol, seed=seed))})
        print(f"  qlearning2d seed {seed}: " + ", ".join(f"{r['method']} gap {r['gap']:.3f}" for r in rows
                                                          if r["seed"] == seed), flush=True)
    return {"rows": rows, "target": ctx.target.summary(), "epochs": epochs}


def render_qlearning2d(data: dict, mode: dict, fig_dir: Path) -> str:
    t = data["target"]
    rows = data["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = (f"\nData: the 10,000 fixed `scratch-gmm2` points; reward h = mode_switch(2), beta = 0.5 "
            f"(J* = {t['J_star']:.4f}). q-learning runs {data['epochs']} epochs x 128 trajectories (EM 20 steps); "
            "DSM pretraining reads the same number of data points (data passes); each fine-tuning baseline then "
            "gets the same terminal reward queries. Evaluated on fresh samples against the exact target "
            "p* ∝ p_data exp(h/β). KL_path is to the exact data process (the score error); mean ± std over seeds.\n")
    cols = [("terminal_queries", "{:.0f}"), ("data_passes", "{:.1f}"), ("wall_s", "{:.0f}"),
            ("reward_mean", "{:.3f}"), ("kl_path", "{:.3f}"), ("objective", "{:.3f}"), ("gap", "{:.3f}"),
            ("mmd", "{:.4f}")]
    table = [[m] + [cell([r.get(k) for r in rows if r["method"] == m], f) for k, f in cols] for m in methods]
    return head + "\n" + md_table(["method", "reward queries", "data passes", "wall s", "E h", "KL_path", "J",
                                   "gap", "MMD² to p*"], table)


# ---- section: LaSRO on the 2-step generator ------------------------------------------------------------------
LASRO_MODES = {  # benchmarks/lasro_2step.py --sweep experiments per suite mode (grid: replaces entries of its SWEEP)
    # quick: LaSRO at one setting only (2 steps: its default, c0 = 15; 1 step: c0 = 3 with 8 generator steps, the
    # setting its 3-seed 1-step sweep chose), the baselines tuned over their learning rate / temperature. At 2 steps
    # digit-correct is saturated (base 0.998), so the quick mode tests it at 1 step, and jpeg at 2 steps.
    "quick": [
        dict(steps=2, lr=3e-5, rewards="jpeg-compressibility", algos="lasro,ddpo,diffusion-dpo",
             grid={"lasro": [{}], "diffusion-dpo": [{"optim": {"lr": lr}, "diffusion_dpo": {"beta_dpo": b}}
                                                    for b in (0.05, 5.0) for lr in (5e-6, 1e-5)]}),
        dict(steps=1, lr=1e-5, rewards="digit-correct", algos="lasro,ddpo,diffusion-dpo",
             grid={"lasro": [{"lasro": {"c0": 3.0, "gen_steps": 8}}],
                   "diffusion-dpo": [{"optim": {"lr": lr}, "diffusion_dpo": {"beta_dpo": b}}
                                     for b in (0.05, 5.0) for lr in (1e-6, 3e-6)]}),
    ],
    "full": [
        dict(steps=2, lr=3e-5, rewards="jpeg-compressibility,digit-correct,digit-alignment",
             algos="lasro,lasro-frozen,ddpo,diffusion-dpo,reward-backprop", grid={}),
        dict(steps=1, lr=1e-5, rewards="digit-correct,jpeg-compressibility",
             algos="lasro,lasro-frozen,ddpo,diffusion-dpo", grid={}),
    ],
}


def section_lasro2step(mode: dict) -> dict | None:
    try:
        import lasro_2step
    except ImportError:
        return None
    name = "quick" if mode is MODES["quick"] else "full"
    out = {"experiments": []}
    for exp in LASRO_MODES[name]:
        m = dict(exp)
        with tempfile.TemporaryDirectory() as tmp:
            args = argparse.Namespace(model="digits-2step", queries=64, lasro=None, eval_every=4, eval_n_curve=200,
                                      eval_n=500, seeds=",".join(map(str, mode["seeds"])), epochs=12,
                                      out=str(Path(tmp) / "lasro.json"), grid=json.dumps(m.pop("grid")), **m)
            out["experiments"].append(lasro_2step.sweep(args))
    return out


def render_lasro2step(data: dict, mode: dict, fig_dir: Path, fig_prefix: str = "") -> str:
    """The suite's section (``{"experiments": [sweep, ...]}``) or one saved --sweep result; plots are written to
    ``fig_dir`` as ``<fig_prefix>lasro<k>step_<reward>.png`` and linked as benchmarks/<name>."""
    if "experiments" in data:
        return "\n".join(f"\n### The generator at {e.get('steps', 2)} step(s)\n"
                         + render_lasro2step(e, mode, fig_dir, fig_prefix) for e in data["experiments"])
    tol = data["tolerance"]
    k = data.get("steps", 2)
    how = ("deterministic DDIM at 2 steps" if k == 2 else
           "the same network used as a 1-step generator: deterministic DDIM at 1 step")
    out = [f"\nThe shipped generator `{data['model']}` (progressive distillation of the digits model; {how}), "
           f"{data['epochs']} epochs x {data['queries_per_epoch']} true-reward queries per epoch for every algorithm"
           + (" (LaSRO spends half of them on the 1-step outputs)" if k == 2 else "") + ", beta = 0, "
           f"seeds {data['seeds']}. Sample quality by the shipped classifier: accuracy, Fréchet distance (FD) in its "
           "feature space to the held-out digits (real train-vs-held-out "
           f"{data['real_vs_real']['frechet_train_vs_test']:.2f}) and diversity. Tolerance for 'quality kept': "
           f"accuracy drop <= {tol['accuracy_drop']}, FD <= {tol['frechet_ratio']}x base, diversity >= "
           f"{tol['diversity_ratio']}x base.\n",
           "Tuned comparison (`benchmarks/lasro_2step.py --sweep`): every algorithm runs each setting of its knob "
           f"(LaSRO: the regulariser weight c0, at policy lr {data.get('lr', 3e-5):g}; the baselines, which have no "
           "regulariser: the learning rate, and Diffusion-DPO's temperature; every setting tried is listed under "
           "the table) on every seed; per algorithm the setting whose every seed stays "
           "within tolerance with the highest mean reward on one fixed noise set (500 noises) is chosen, and "
           "reported on a second, held-out noise set (500 noises). Mean ± std over seeds.\n"]
    for reward, sel in data["selected"].items():
        base = data["base"][reward]["test"]
        out.append(f"\n**reward `{reward}`** ({k}-step generator: its reward is the reward ({k}-step) column; "
                   "held-out noise)\n")
        rows = [["base generator", "—", f"{base['reward_2step']:.4f}", f"{base['reward_1step']:.4f}",
                 f"{base[f'accuracy_{k}step']:.3f}", f"{base[f'frechet_{k}step']:.2f}",
                 f"{base[f'diversity_{k}step']:.2f}", "—"]]
        for algo, s in sel.items():
            t = s["test"]
            nf = sum(x["feasible"] for x in s["settings"])
            chosen = s["chosen"] if s["chosen"] else f"none feasible; best: {s['best_infeasible']}"
            rows.append([algo, f"{chosen} ({nf} of {len(s['settings'])} feasible)"]
                        + [cell(t[key], f) for key, f in (("reward_2step", "{:.4f}"), ("reward_1step", "{:.4f}"),
                                                          ("accuracy", "{:.3f}"), ("frechet", "{:.2f}"),
                                                          ("diversity", "{:.2f}"))]
                        + [f"{sum(t['within_tolerance'])} of {len(t['within_tolerance'])}"])
        out.append(md_table(["algo", "chosen setting", "reward (2-step)", "reward (1-step)", f"accuracy ({k}-step)",
                             f"FD ({k}-step)", f"diversity ({k}-step)", "seeds within tolerance"], rows))
        runs = [r for r in data["runs"] if r["reward"] == reward]
        out.append("\nEvery setting tried (mean reward on the selection noise; seeds within tolerance there):\n")
        for algo, s in sel.items():
            tried = []
            for t in s["settings"]:
                ok = sum(all(r["quality_within_tolerance"].values()) for r in runs
                         if r["algo"] == algo and r["setting"] == t["setting"])
                tried.append(f"{t['setting']} {t['reward_select']:.4f} ({ok}/{len(t['seeds'])})")
            out.append(f"- {algo}: " + "; ".join(tried))
        fig = _plot_reward_curves(runs, sel, k, fig_dir / f"{fig_prefix}lasro{k}step_{reward}.png",
                                  f"{k}-step digits generator, reward {reward}: chosen setting of each algorithm")
        if fig:
            out.append(f"\n![reward vs reward queries, {reward}](benchmarks/{fig.name})")
        acc = {a: [r["train_log"][-1].get("lasro/surrogate_acc_fresh") for r in runs
                   if r["algo"] == a and r["setting"] == sel[a]["chosen"]] for a in ("lasro", "lasro-frozen") if a in sel}
        acc = {a: v for a, v in acc.items() if v and None not in v}
        if acc:
            out.append("\nSurrogate ranking accuracy on the last epoch's fresh samples (before it trains on them): "
                       + "; ".join(f"{a} {cell(v)}" for a, v in acc.items()) + ".")
    return "\n".join(out)


def _plot_reward_curves(runs: list[dict], sel: dict, k: int, path: Path, title: str) -> Path | None:
    made = _new_figure(path)
    if made is None:
        return None
    plt, fig, ax = made
    curves = {}
    for algo, s in sel.items():
        label = s["chosen"] or s["best_infeasible"]
        ra = [r for r in runs if r["algo"] == algo and r["setting"] == label]
        n = min(len(r["curve"]) for r in ra)
        q = [ra[0]["curve"][i]["reward_queries"] for i in range(n)]
        curves[algo] = (q, [statistics.mean(r["curve"][i][f"reward_{k}step"] for r in ra) for i in range(n)], label,
                        bool(s["chosen"]))
    feasible = [v for q, m, _, ok in curves.values() if ok for v in m]
    lo, hi = (min(feasible), max(feasible)) if feasible else (None, None)
    for algo, (q, m, label, ok) in curves.items():
        off = lo is not None and (max(m) > hi + (hi - lo) or min(m) < lo - (hi - lo))
        ax.plot(q, m, marker="o", ms=3, ls="-" if ok else ":",
                label=f"{algo} ({label})" + ("" if ok else ", out of tolerance" + (", off scale" if off else "")))
    if lo is not None and hi > lo:
        pad = 0.25 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
    return _save_figure(plt, fig, ax, path, "true-reward queries", f"true reward of the {k}-step generator", title, 7)


# ---- section: the strongest current baselines (METHODS section 9) on the exact 2-D yardstick ----------------
def section_baselines(mode: dict) -> dict:
    """Adjoint Matching, Flow-GRPO (and -Fast) and DiffusionNFT on the yardstick (as section finetune2d, with the
    same budgets and evaluation), plus the discretisation floor: the gap the exact optimal control leaves on the
    training grid (EM 20)."""
    import yardstick2d

    sub = {**mode, "algos": mode["bl_algos"] or yardstick2d.NEW_ALGOS, "seeds": mode["bl_seeds"]}
    data = section_finetune2d(sub)
    data["floors"] = [yardstick2d.discretisation_floor(r, n_eval=mode["n_eval"], seeds=mode["bl_seeds"])
                      for r in mode["rewards"]]
    return data


def render_baselines(data: dict, mode: dict, fig_dir: Path) -> str:
    out = ["Adjoint Matching (memoryless EM rollouts, lean adjoint with the reference's vector-Jacobian products), "
           "Flow-GRPO (groups of 8, PPO-clip on the summed per-step log-density, KL to the reference with the run's "
           "beta), Flow-GRPO-Fast (ODE steps with a random window of 4 SDE steps in the first 10, eta = 1) and "
           "DiffusionNFT (clean samples and rewards only, old policy an EMA; defaults, and kl_coef = 1). Seeds: "
           + ", ".join(map(str, mode["bl_seeds"])) + ". "
           "See docs/BASELINES.md for what each run means and the longer 3-seed tables.\n"]
    rows = [[fl["reward"], f"{fl['solver']} {fl['steps']}", f"{fl['J_star']:.4f}"]
            + [f"{fl[k]:.3f}" for k in ("reward_mean", "kl_path", "objective", "gap", "mmd")] for fl in data["floors"]]
    out.append("Discretisation floor: the exact optimal control s* = grad log p*_t sampled and evaluated like the "
               "trained models.\n")
    out.append(md_table(["reward", "grid", "J*", "E r", "KL_path", "J", "gap", "MMD² to p*"], rows))
    out.append(render_finetune2d(data, {**mode, "seeds": mode["bl_seeds"]}, fig_dir, prefix="baselines"))
    rows = []
    for r in data["runs"]:
        rows.append([r["reward"], r["algo"], r["seed"], str(r["queries_to_90pct"] or "not reached"),
                     f"{r.get('train_per_epoch_s', float('nan')):.3f}"])
    out.append("\nQueries to 90% of J* - J_ref and training wall-clock per epoch (256 rollouts of 20 steps):\n")
    out.append(md_table(["reward", "algo", "seed", "queries to 90%", "s / epoch"], rows))
    return "\n".join(out)


# ---- section: the rectified-flow 2-D yardstick ------------------------------------------------------------------
def section_flow2d(mode: dict) -> dict:
    """Every method on 'gmm2-rf-exact' (the exact mixture velocity plus a residual; ddim eta = 1 rollouts and
    evaluation, 20 steps), with the discretisation floor of the exact optimal control on the same grid."""
    import yardstick2d

    m = mode["flow"]
    runs = []
    for rname in m["rewards"]:
        for algo in m["algos"]:
            for seed in m["seeds"]:
                res = yardstick2d.run_one(rname, algo, seed, m["budgets"], eval_every=5, n_eval=mode["n_eval"],
                                          flow=True)
                last = res["at_budget"][max(m["budgets"])]
                print(f"  flow2d {rname} {algo} seed {seed}: J {last['objective']:.4f} gap {last['gap']:.3f} "
                      f"({res['wall_s']:.0f} s)", flush=True)
                runs.append(res)
    floors = [yardstick2d.discretisation_floor(r, n_eval=mode["n_eval"], seeds=m["seeds"], flow=True)
              for r in m["rewards"]]
    return {"runs": runs, "floors": floors}


def render_flow2d(data: dict, mode: dict, fig_dir: Path) -> str:
    import yardstick2d

    m = mode["flow"]
    return ("`gmm2-rf-exact`: the exact velocity of the 'gmm2' mixture on the rectified flow plus a zero-initialised "
            "residual MLP (p_ref, p* and J* as for the VP yardstick); rollouts and evaluation by ddim eta = 1 (the "
            "exact Gaussian step) with 20 steps; KL_path with the velocity models' quadrature (`solvers.kl_weights`). "
            "The floor is the exact optimal control sampled and evaluated the same way. Seeds: "
            + ", ".join(map(str, m["seeds"])) + ".\n" + yardstick2d.table(data["runs"], m["budgets"], data["floors"]))


# ---- section: the digits main job, side by side ---------------------------------------------------------------
def section_digits(mode: dict) -> dict | None:
    """CTRL, DPOK and the strongest current baselines fine-tuning the shipped digits models (VP UNet and rectified
    flow) with the main job's defaults (benchmarks/digits_side_by_side.py)."""
    import digits_side_by_side as sbs

    m = mode["digits"]
    if m is None:
        return None
    out = {}
    for model in m["models"]:
        runs = []
        for method in m["methods"] or list(sbs.METHODS):
            r = sbs.run(method, model, 0, m["epochs"], m["n"])
            print(f"  digits {model} {method}: J {r['eval'][r['train_solver']]['ft']['objective']:.3f} "
                  f"({r['wall_s']:.0f} s)", flush=True)
            runs.append(r)
        out[model] = {"meta": {"n": m["n"]}, "runs": runs}
    return out


def render_digits(data: dict, mode: dict, fig_dir: Path) -> str:
    import digits_side_by_side as sbs

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for model, d in data.items():
            paths.append(str(Path(tmp) / f"{model}.json"))
            Path(paths[-1]).write_text(json.dumps(d))
        return ("One run each, seed 0, with the main job's defaults (" + ("its epochs" if mode["digits"]["epochs"]
                is None else f"{mode['digits']['epochs']} epochs") + "). Rollouts: EM 20 on the VP model, ddim eta 1 "
                "on the flow. See `benchmarks/digits_side_by_side.py`.\n" + sbs.render(paths))


CTRL_MODES = {  # benchmarks/ctrl_promises.py at the suite's sizes (None: not in that mode)
    "smoke": None,
    "quick": dict(epochs=20, n=200, grid=dict(tasks=["digit-alignment", "centering", "toy2d-mode-switch"],
                                               scales=[1.0, 10.0], seeds=[0], epochs=10)),
    "full": dict(epochs=None, n=500, grid=dict(tasks=None, scales=[1.0, 0.1, 10.0], seeds=[0, 1, 2], epochs=None)),
}


def section_ctrl(mode: dict) -> dict | None:
    """CTRL's promises (benchmarks/ctrl_promises.py): the main job at every solver, and J >= J_ref vs DPOK."""
    import ctrl_promises as cp

    name = next(k for k, v in MODES.items() if v is mode)
    m = CTRL_MODES[name]
    if m is None:
        return None
    rob = cp.robustness(argparse.Namespace(seed=0, epochs=m["epochs"], n=m["n"]))
    g = m["grid"]
    with tempfile.TemporaryDirectory() as tmp:
        cp.RESULTS = Path(tmp)  # the suite keeps its own copy; the saved standalone results stay as they are
        grid = cp.grid(argparse.Namespace(tasks=g["tasks"] or list(cp.GRID), scales=g["scales"], seeds=g["seeds"],
                                          algos=["ctrl", "dpok"], epochs=g["epochs"], n=m["n"], resume=False))
    return {"robustness": rob, "grid": grid}


def render_ctrl(data: dict, mode: dict, fig_dir: Path) -> str:
    import ctrl_promises as cp

    with tempfile.TemporaryDirectory() as tmp:
        cp.RESULTS = Path(tmp)
        (cp.RESULTS / "ctrl_promises_robustness.json").write_text(json.dumps(data["robustness"]))
        (cp.RESULTS / "ctrl_promises_grid.json").write_text(json.dumps(data["grid"]))
        return cp.render()


SECTIONS = {
    "ctrl": ("CTRL's promises: the main job at every solver; J never below the start, against DPOK", section_ctrl,
             render_ctrl),
    "finetune2d": ("CTRL vs DDPO / DPOK / reward backprop / Diffusion-DPO on the exact 2-D yardstick",
                   section_finetune2d, render_finetune2d),
    "baselines": ("Adjoint Matching, Flow-GRPO (-Fast) and DiffusionNFT on the exact 2-D yardstick",
                  section_baselines, render_baselines),
    "flow2d": ("Every method on the rectified-flow 2-D yardstick", section_flow2d, render_flow2d),
    "digits": ("The digits main job side by side: CTRL, DPOK and the current baselines on the VP and flow models",
               section_digits, render_digits),
    "qlearning2d": ("q-learning from data vs pretrain + fine-tune (2-D)", section_qlearning2d, render_qlearning2d),
    "lasro2step": ("LaSRO vs DDPO / Diffusion-DPO on the few-step digits generator", section_lasro2step,
                   render_lasro2step),
}


# ---- the page and the reproducibility check ----------------------------------------------------------------
def numbers(obj, prefix: str = "") -> dict[str, float]:
    """Flatten every non-timing number of a results tree -> {path: value} (for --check)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            k = str(k)
            if k.endswith("_s") or k in ("wall_s", "seconds", "machine", "started"):
                continue
            out.update(numbers(v, f"{prefix}/{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numbers(v, f"{prefix}[{i}]"))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def check_against(old: dict, new: dict) -> tuple[int, int, list[str]]:
    """Compare two suite results: returns (n_compared, n_equal, lines describing differences)."""
    a, b = numbers(old["sections"]), numbers(new["sections"])
    keys = sorted(set(a) & set(b))
    diffs = [k for k in keys if not (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])))]
    lines = [f"{k}: {a[k]:.6g} -> {b[k]:.6g}" for k in diffs[:50]]
    return len(keys), len(keys) - len(diffs), lines


def render_page(result: dict, mode_name: str, fig_dir: Path) -> str:
    m = result["machine"]
    mode = MODES[mode_name]
    secs = result["seconds"]
    lines = [
        "# Benchmarks",
        "",
        f"This page is written by one command, `{result['command']}`, run on "
        f"{result['started'][:16].replace('T', ' ')} UTC at commit `{m['commit']}`.",
        "",
        f"- **Machine**: {m['cpu']}, {m['cores']} CPU cores, {m['memory']} RAM, "
        f"{'a GPU' if m['gpu'] else 'no GPU'}; torch {m['torch']}, Python {m['python']}, {m['threads']} torch thread(s).",
        f"- **Seeds**: {', '.join(map(str, mode['seeds']))} (2-D fine-tuning and LaSRO); "
        f"{', '.join(map(str, mode['ql_seeds']))} (q-learning). Cells are mean ± standard deviation over the seeds: "
        "that is the spread within which a rerun reproduces them (on this machine with the same thread count a rerun "
        "reproduces every non-timing number exactly: `--check` verifies it).",
        f"- **Time**: {secs['total'] / 60:.1f} min in all ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items() if k != "total") + ").",
        f"- **Mode**: `{mode_name}`" + (" (the full mode, `python benchmarks/run.py`, uses 3 seeds, both 2-D rewards, "
                                          "budgets 5k / 20k / 50k and 2,000 evaluation samples)" if mode_name != "full"
                                          else "") + ".",
        "",
        "Longer benchmarks that run on their own (the full yardstick, the digits main job, q-learning on digits, "
        "sampling speed, trainer overhead, ratio-estimator accuracy) and their numbers are in "
        "[RESULTS.md](RESULTS.md).",
    ]
    for i, (key, (title, _, render)) in enumerate(SECTIONS.items(), 1):
        data = result["sections"].get(key)
        lines += ["", f"## {i}. {title}", ""]
        if data is None:
            lines.append("Not run: " + result["skipped"].get(key, "not selected (--sections)") + ".")
            continue
        lines.append(render(data, mode, fig_dir))
    if result.get("check"):
        c = result["check"]
        lines += ["", "## Reproducibility check", "",
                  f"Rerun compared with `{c['against']}`: {c['equal']} of {c['compared']} non-timing numbers identical."]
        lines += [f"- {d}" for d in c["diffs"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick mode (about 30 min on 2 CPU cores)")
    g.add_argument("--smoke", action="store_true", help="a seconds-long run of the machinery (tests)")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible and fastest on a "
                    "shared machine; a rerun must use the same count to reproduce the numbers exactly)")
    ap.add_argument("--doc", default=None, help="page to write (default docs/BENCHMARKS.md; none for --smoke)")
    ap.add_argument("--json", default=None, help="results file (default benchmarks/results/suite_<mode>.json)")
    ap.add_argument("--check", default=None, metavar="OLD_JSON", help="compare the rerun with an earlier results file")
    args = ap.parse_args(argv)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    old = None
    if args.check:
        try:
            old = json.loads(Path(args.check).read_text())
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"--check {args.check}: cannot read an earlier results file ({e})")
    json_path = Path(args.json or HERE / "results" / f"suite_{mode_name}.json")
    doc = Path(args.doc) if args.doc else (None if args.smoke else ROOT / "docs" / "BENCHMARKS.md")
    fig_dir = (doc.parent if doc else json_path.parent) / "benchmarks"
    cmd = "python benchmarks/run.py" + {"quick": " --quick", "smoke": " --smoke", "full": ""}[mode_name]
    if args.threads != 1:
        cmd += f" --threads {args.threads}"
    result = {"command": cmd, "mode": mode_name, "machine": machine(),
              "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "sections": {}, "skipped": {},
              "seconds": {}}
    t_all = time.perf_counter()
    for key in SECTIONS:
        if ((key == "lasro2step" and not mode["lasro"]) or (key == "ctrl" and CTRL_MODES[mode_name] is None)
                or (key == "digits" and mode["digits"] is None)):
            result["skipped"][key] = f"not part of the {mode_name} mode"
            continue
        if key not in args.sections:
            result["skipped"][key] = "not selected (--sections)"
            continue
        print(f"[{key}] ...", flush=True)
        t0 = time.perf_counter()
        data = SECTIONS[key][1](mode)
        if data is None:
            result["skipped"][key] = "its benchmark (benchmarks/lasro_2step.py) is not available in this checkout"
            continue
        result["sections"][key] = data
        result["seconds"][key] = round(time.perf_counter() - t0, 1)
    result["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    if old is not None:
        n, eq, diffs = check_against(old, result)
        result["check"] = {"against": str(args.check), "compared": n, "equal": eq, "diffs": diffs}
        print(f"check: {eq} of {n} non-timing numbers identical to {args.check}")
        for d in diffs:
            print("  " + d)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render_page(result, mode_name, fig_dir))
        print(f"wrote {doc}")
    print(f"wrote {json_path} ({result['seconds']['total'] / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
