"""``ctrldiff report``: one self-contained HTML page comparing training runs.

Sections: reward / KL_path / J curves of all runs overlaid, a summary table (final reward, KL_path, J,
reward queries, wall time, config highlights), J under several solvers and step counts (computed with
:mod:`ctrldiff.eval.run_eval`) and each run's before/after samples. Every picture is embedded as a
base64 PNG data URI, so the page can be mailed or archived as one file. A small inline script marks each
image with ``data-loaded`` once the browser has decoded it (the page's own self-check, used by the tests).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import load_yaml
from ..errors import CtrlDiffError
from ..train.checkpoint import read_jsonl

if TYPE_CHECKING:
    from .run_eval import SolverSpec

CURVE_KEYS = (("reward_mean", "E r"), ("kl_path", "KL_path"), ("objective", "J = E r - beta KL_path"))
CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3;white-space:nowrap}td.l,th.l{text-align:left}small{color:#666}img{max-width:100%}
.run{margin:16px 0}.note{color:#555;font-size:90%}"""
CHECK_JS = """window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){var g=im[i].complete&&im[i].naturalWidth>0;im[i].setAttribute('data-loaded',g?'1':'0');
if(g)ok++;}document.body.setAttribute('data-images',ok+'/'+im.length);});"""


class RunInfo:
    """A run directory's config, metrics and label."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.yaml").exists():
            raise CtrlDiffError(f"{self.path} is not a ctrldiff run directory (no config.yaml)")
        self.config = load_yaml(self.path / "config.yaml")
        self.records = read_jsonl(self.path / "metrics.jsonl") if (self.path / "metrics.jsonl").exists() else []
        fe = self.path / "final_eval.json"
        self.final_eval = json.loads(fe.read_text()) if fe.exists() else {}
        self.label = f"{self.config.get('algo', '?')}: {self.path.resolve().name}"

    def highlights(self) -> str:
        c, s, o = self.config, self.config.get("sampler", {}), self.config.get("optim", {})
        parts = [f"model {c.get('model')}", f"reward {c.get('reward')}", f"beta {c.get('beta')}",
                 f"{c.get('epochs')} epochs x {c.get('batch_size')}", f"{s.get('solver')}:{s.get('steps')}",
                 f"lr {o.get('lr')}", f"seed {c.get('seed')}"]
        if s.get("guidance") is not None:
            parts.append(f"CFG {s['guidance']}")
        if c.get("algo") == "ctrl":
            parts.append(f"estimator {c.get('ctrl', {}).get('estimator', '?')}")
        return ", ".join(parts)


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def curves_png(runs: list[RunInfo]) -> bytes:
    """Reward, KL_path and J against epoch, one line per run, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(5 * len(CURVE_KEYS), 3.6))
    for ax, (key, title) in zip(axes, CURVE_KEYS, strict=True):
        for run in runs:
            recs = [r for r in run.records if key in r]
            ax.plot([r.get("epoch", i) for i, r in enumerate(recs)], [r[key] for r in recs], marker=".", label=run.label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _num(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else html.escape(str(v))


def summary_table(runs: list[RunInfo]) -> str:
    head = ("<tr><th class=l>run</th><th>epochs</th><th>last E r</th><th>last KL_path</th><th>last J</th>"
            "<th>final eval J<br><small>reference &rarr; tuned</small></th><th>reward queries</th><th>wall s</th>"
            "<th class=l>config</th></tr>")
    rows = []
    for run in runs:
        last = run.records[-1] if run.records else {}
        rows.append(f"<tr><td class=l>{html.escape(run.label)}<br><small>{html.escape(str(run.path))}</small></td>"
                    f"<td>{len(run.records)}</td><td>{_num(last.get('reward_mean'))}</td>"
                    f"<td>{_num(last.get('kl_path'))}</td><td>{_num(last.get('objective'))}</td>"
                    f"<td>{_final_eval(run.final_eval)}</td><td>{_num(last.get('reward_queries'))}</td>"
                    f"<td>{_num(last.get('wall_s'), '.1f')}</td>"
                    f"<td class=l><small>{html.escape(run.highlights())}</small></td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _final_eval(fe: dict) -> str:
    """J of the reference and of the tuned model on the trainer's fixed-noise samples (final_eval.json)."""
    before, after = fe.get("before") or {}, fe.get("after") or {}
    if "objective" not in after:
        return "-"
    return (f"{_num(before.get('objective'))} &rarr; {_num(after['objective'])}<br>"
            f"<small>n {after.get('n')}, {html.escape(str(after.get('solver')))}:{after.get('steps')}</small>")


def unusable_run(path: str | Path) -> str | None:
    """Why ``path`` cannot be reported (not a directory, no config.yaml, no finished epoch), or None."""
    p = Path(path)
    if not p.is_dir():
        return "not a directory"
    if not (p / "config.yaml").exists():
        return "not a ctrldiff run directory (no config.yaml)"
    m = p / "metrics.jsonl"
    if not m.exists() or not read_jsonl(m):
        return "no finished epoch (metrics.jsonl is missing or empty)"
    return None


def _before_after_table(run: RunInfo) -> str:
    """Mean reward per condition before -> after on the figure's samples (samples/before_after.json)."""
    f = run.path / "samples" / "before_after.json"
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        return ""
    cols = doc.get("columns") or []
    head = "<tr><th class=l>condition</th>" + "".join(f"<th>{html.escape(str(c['condition']))}</th>" for c in cols)
    rows = [head + "</tr>"]
    for key, name in (("mean_before", "reward before"), ("mean_after", "reward after")):
        cells = []
        for c in cols:
            v, b = c.get(key), c.get("mean_before")
            style = ""
            if key == "mean_after" and v is not None and b is not None and v != b:
                style = ' style="color:#1a7f37"' if v > b else ' style="color:#cf222e"'
            cells.append(f"<td{style}>{_num(v, '.3f')}</td>")
        rows.append(f"<tr><th class=l>{name}</th>{''.join(cells)}</tr>")
    return (f"<p>reward <b>{html.escape(str(doc.get('reward')))}</b> on these {doc.get('n')} same-noise samples: higher "
            f"after fine-tuning for <b>{doc.get('higher_after')} of {doc.get('n')}</b></p><table>{''.join(rows)}</table>")


def robustness_table(runs: list[RunInfo], docs: list[dict | Exception]) -> str:
    """Rows: runs; columns: solver:steps; cells J with E r, KL_path (and gap / accuracy when known)."""
    labels = next((tuple(r["label"] for r in d["results"]) for d in docs if isinstance(d, dict)), ())
    head = ("<tr><th class=l>run</th>" + "".join(f"<th>{html.escape(lb)}</th>" for lb in labels)
            + "<th>exact J*</th></tr>")
    rows = []
    for run, doc in zip(runs, docs, strict=True):
        if isinstance(doc, Exception):
            cells = f"<td class=l colspan={len(labels) + 1}>not evaluated: {html.escape(str(doc))}</td>"
        else:
            j_star = (doc.get("exact") or {}).get("J_star")
            cells = "".join(_robust_cell(r) for r in doc["results"]) + f"<td>{_num(j_star)}</td>"
        rows.append(f"<tr><td class=l>{html.escape(run.label)}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _robust_cell(r: dict) -> str:
    extra = f"r {_num(r['reward_mean'], '.3f')}, KL {_num(r['kl_path'], '.3f')}"
    if r.get("optimality_gap") is not None:
        extra += f", gap {_num(r['optimality_gap'], '.3f')}"
    if r.get("accuracy") is not None:
        extra += f", acc {_num(r['accuracy'], '.2f')}, FD {_num(r.get('frechet'), '.2f')}"
    return f"<td><b>{_num(r['objective'])}</b><br><small>{extra}</small></td>"


def _robustness(runs: list[RunInfo], solvers: list[SolverSpec], n: int, seed: int,
                log: Callable[[str], None]) -> list[dict | Exception]:
    from .run_eval import evaluate_setup
    from .target import load_setup

    docs: list[dict | Exception] = []
    for run in runs:
        log(f"robustness: {run.path} ({len(solvers)} solvers x {n} samples)")
        try:
            docs.append(evaluate_setup(load_setup(str(run.path)), solvers, n=n, seed=seed))
        except CtrlDiffError as e:  # one broken run does not lose the others' report
            docs.append(e)
    return docs


def build_report(run_dirs: list[str | Path], *, solvers: list[SolverSpec] | None = None, n: int = 64, seed: int = 0,
                 log: Callable[[str], None] = lambda m: None) -> str:
    """The HTML page (a string). ``solvers`` None skips the robustness table."""
    if not run_dirs:
        raise CtrlDiffError("report needs at least one run directory")
    runs, skipped = [], []
    for p in run_dirs:  # `ctrldiff report runs/*` passes whatever runs/ holds: skip what is not a (started) run
        why = unusable_run(p)
        if why:
            skipped.append(f"{p}: {why}")
            log(f"skipping {p}: {why}")
        else:
            runs.append(RunInfo(p))
    if not runs:
        raise CtrlDiffError("nothing to report: " + "; ".join(skipped[:3]) + (f" (and {len(skipped) - 3} more)"
                                                                             if len(skipped) > 3 else ""))
    parts = [f"<h1>ctrldiff report</h1><p class=note>{len(runs)} run(s), generated {time.strftime('%Y-%m-%d %H:%M')}."
             " J = E r - beta KL_path; KL_path is the Girsanov path KL to the reference model.</p>",
             "<h2>Training curves</h2>", f'<img alt="training curves" src="{png_data_uri(curves_png(runs))}">',
             "<h2>Summary (last epoch)</h2>", summary_table(runs)]
    if solvers:
        docs = _robustness(runs, solvers, n, seed, log)
        parts += ["<h2>Solver / step robustness</h2>",
                  f"<p class=note>J per solver:steps with {n} samples each (same seed for every cell; DDIM eta 0). "
                  "Rollout solver during training: see the config column above. Exact J*: the optimum of J for "
                  "'*-exact' runs (optimality gap = (J* - J) / |J*|). With deterministic solvers (ddim eta 0, heun, "
                  "dpmpp-2m) KL_path is the Girsanov integrand averaged along ODE paths, which matches the sampled "
                  "distribution only for a consistent score: there J may exceed J* (negative gap).</p>",
                  robustness_table(runs, docs)]
    parts.append("<h2>Samples before / after fine-tuning</h2><p class=note>The same noise through the reference model "
                 "(top block) and the tuned one (bottom block), one column per condition; under each sample its reward "
                 "(green: higher than the same noise's before-sample, red: lower).</p>")
    for run in runs:
        img = run.path / "samples" / "before_after.png"
        body = (f'<img alt="before/after {html.escape(run.label)}" src="{png_data_uri(img.read_bytes())}">'
                if img.exists() else "<p class=note>no samples/before_after.png (run not finished?)</p>")
        parts.append(f"<div class=run><h3>{html.escape(run.label)}</h3>{_before_after_table(run)}{body}</div>")
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>ctrldiff report</title><style>{CSS}</style>"
            f"<script>{CHECK_JS}</script></head><body>{''.join(parts)}</body></html>")


def write_report(run_dirs: list[str | Path], out: str | Path = "report.html", **kwargs) -> Path:
    """Write :func:`build_report` to ``out``; returns its path."""
    out = Path(out)
    page = build_report(run_dirs, **kwargs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise CtrlDiffError(f"cannot write report {out}: {e.strerror or e}") from None
    return out
