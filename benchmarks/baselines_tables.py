"""Tables of docs/BASELINES.md section 9 from the yardstick's result files: every algorithm side by side (the
earlier runs of CTRL / DDPO / DPOK / reward backprop / Diffusion-DPO and the new ones), the discretisation floor,
and the step-robustness table of the new methods.

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


if __name__ == "__main__":
    main()
