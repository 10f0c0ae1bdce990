"""Tables of docs/BASELINES.md section 9 from the yardstick's result files: every algorithm side by side (the
earlier runs of CTRL / DDPO / DPOK / reward backprop / Diffusion-DPO and the new ones), the discretisation floor,
the step-robustness table of the new methods, and the queries each needs to 90% of the attainable improvement.

    python benchmarks/baselines_tables.py benchmarks/results/yardstick2d.json \\
        benchmarks/results/yardstick2d_baselines.json benchmarks/results/yardstick2d_new.json \\
        --floors benchmarks/results/yardstick2d_floors.json
"""

from __future__ import annotations

import argparse
import json
import statistics

from yardstick2d import table


def robust_table(results: list[dict]) -> str:
    rs = [r for r in results if r.get("robust")]
    if not rs:
        return ""
    sol = list(rs[0]["robust"])
    lines = []
    for rname in dict.fromkeys(r["reward"] for r in rs):
        lines.append(f"\n**reward {rname}**: J of the model trained with EM 20 (at the last budget), evaluated with "
                     "other solvers / step counts (mean over seeds)\n")
        lines.append("| algo | " + " | ".join(s.replace(":", " ") for s in sol) + " |")
        lines.append("|---" * (len(sol) + 1) + "|")
        for algo in dict.fromkeys(r["algo"] for r in rs if r["reward"] == rname):
            ra = [r for r in rs if r["reward"] == rname and r["algo"] == algo]
            cells = []
            for s in sol:
                v = statistics.mean(r["robust"][s]["objective"] for r in ra)
                cells.append(f"{v:.3f}" if abs(v) < 1e4 else f"{v:.1e}")
            lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CTRL_FAMILY = ("ctrl-a", "ctrl-b")
MODERN = ("flow-grpo", "flow-grpo-fast", "diffusion-nft", "diffusion-nft-kl1")


def queries_to(curve: list[dict], level: float) -> int | None:
    """The first evaluated budget whose J reaches ``level`` (None: never within the run)."""
    return next((c["queries"] for c in curve if c["objective"] >= level), None)


def attainable_table(results: list[dict], floors: list[dict], frac: float = 0.9) -> str:
    """Queries to reach ``frac`` of the attainable improvement J_floor - J_ref, where J_floor is the J of the exact
    optimal control on the training grid (the discretisation floor: what any method can attain on that grid, up to
    the KL quadrature, see docs/BASELINES.md), per seed, from each run's evaluation curve (every 5 epochs = 1280
    queries); and the compass ratio: CTRL's best (the lower mean over its seeds, a seed that never reaches it counted
    at its last budget) over the best of Flow-GRPO (-Fast) / DiffusionNFT."""
    lines = []
    for fl in floors:
        rname = fl["reward"]
        rs = [r for r in results if r["reward"] == rname]
        if not rs:
            continue
        j_ref = rs[0]["J_ref"]
        level = j_ref + frac * (fl["objective"] - j_ref)
        lines.append(f"\n**reward {rname}**: queries to {frac:.0%} of J_floor - J_ref (J_ref {j_ref:.4f}, J_floor "
                     f"{fl['objective']:.4f}: J >= {level:.4f})\n")
        lines.append("| algo | queries per seed | mean (unreached counted at the run's end) | best J reached / J_floor |")
        lines.append("|---|---|---|---|")
        means = {}
        for algo in dict.fromkeys(r["algo"] for r in rs):
            ra = [r for r in rs if r["algo"] == algo]
            hits = [queries_to(r["curve"], level) for r in ra]
            ends = [r["curve"][-1]["queries"] for r in ra]
            means[algo] = statistics.mean(h if h is not None else e for h, e in zip(hits, ends, strict=True))
            best = max(max(c["objective"] for c in r["curve"]) for r in ra)
            lines.append(f"| {algo} | " + ", ".join(str(h) if h is not None else "not reached" for h in hits)
                         + f" | {means[algo]:.0f}{'' if all(h is not None for h in hits) else ' (lower bound)'} | "
                         f"{best:.4f} / {fl['objective']:.4f} |")
        ours = {a: m for a, m in means.items() if a in CTRL_FAMILY}
        theirs = {a: m for a, m in means.items() if a in MODERN}
        if ours and theirs:
            a, b = min(ours, key=ours.get), min(theirs, key=theirs.get)
            lines.append(f"\nCompass: {a} {ours[a]:.0f} / {b} {theirs[b]:.0f} = **{ours[a] / theirs[b]:.2f}x** the "
                         "queries (target <= 0.5x)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--floors", default=None)
    ap.add_argument("--budgets", type=int, nargs="+", default=[5000, 20000, 50000])
    args = ap.parse_args()
    results = [r for f in args.files for r in json.load(open(f))["results"]]
    floors = json.load(open(args.floors)) if args.floors else []
    print(table(results, args.budgets, [f for f in floors if f["steps"] == 20]))
    print(robust_table(results))
    print(attainable_table(results, [f for f in floors if f["steps"] == 20]))


if __name__ == "__main__":
    main()
