"""``ctrldiff export RUN --out DIR``: a finished run as a folder ready for ``huggingface-cli upload``.

DIR holds the weights (diffusers LoRA runs: ``pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights(DIR)``
loads; full fine-tuning: the whole pipeline; built-in models: ``model.safetensors`` + ``model.json``), a README.md
model card with YAML front matter (base_model, tags, library_name) and the run's numbers (reward, algorithm, beta,
KL_path, J before -> after on the held-out evaluation), the before/after sample figure, the reward curve, the
run's config.yaml and final_eval.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import yaml

from .errors import CtrlDiffError


def _kind(run: Path, cfg) -> str:
    from .train.task import _is_diffusers_spec

    if not _is_diffusers_spec(cfg.model):
        return "builtin"
    return "full" if cfg.diffusers.full_finetune else "lora"


def _check_finished(run: Path, kind: str) -> Path:
    need = {"lora": run / "lora" / "pytorch_lora_weights.safetensors", "full": run / "pipeline" / "model_index.json",
            "builtin": run / "final_model.safetensors"}[kind]
    if not need.exists():
        raise CtrlDiffError(f"{run} has no final weights ({need.relative_to(run)}): the run has not finished; finish it "
                            f"with `ctrldiff train --resume {run}` first")
    return need


def model_card(cfg, kind: str, base_model: str, final_eval: dict, files: list[str]) -> str:
    """README.md of the exported folder: YAML front matter for the hub, then what was trained and how well."""
    tags = ["ctrldiff", "reward-fine-tuning", cfg.algo]
    if kind != "builtin":
        tags += ["diffusers", "text-to-image"] + (["lora"] if kind == "lora" else [])
    front = {"base_model": base_model, "library_name": "diffusers" if kind != "builtin" else "ctrldiff", "tags": tags}
    b, a = final_eval.get("before") or {}, final_eval.get("after") or {}

    def num(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    what = {"lora": "a LoRA", "full": "a full fine-tune", "builtin": "a fine-tune"}[kind]
    rows = [("base model", f"`{base_model}`"), ("reward", f"`{cfg.reward}`"), ("algorithm", f"`{cfg.algo}` (ctrldiff)"),
            ("beta (KL_path weight)", f"{cfg.beta:g}"),
            ("J = E r - beta KL_path, before -> after", f"{num(b.get('objective'))} -> **{num(a.get('objective'))}**"),
            ("E r, before -> after", f"{num(b.get('reward_mean'))} -> {num(a.get('reward_mean'))}"),
            ("KL_path (Girsanov, to the base model)", num(a.get("kl_path"))),
            ("evaluation", f"{a.get('n', '-')} fixed-noise samples, {a.get('solver', '-')} {a.get('steps', '-')} steps"
                           if a else "none (log.num_final_eval = 0)"),
            ("training", f"{cfg.epochs} epochs x {cfg.batch_size} samples, {cfg.sampler.solver} {cfg.sampler.steps} "
                         f"steps, lr {cfg.optim.lr:g}, seed {cfg.seed}"
                         + (f", guidance {cfg.sampler.guidance:g}" if cfg.sampler.guidance is not None else ""))]
    if kind == "lora":
        rows.append(("LoRA", f"rank {cfg.diffusers.lora_rank}, alpha {cfg.diffusers.lora_alpha or cfg.diffusers.lora_rank}"))
    if kind == "builtin":
        use = ("```bash\npip install ctrldiff\nctrldiff sample --model model.safetensors --steps 50 --out samples\n```\n"
               "or in Python: `ctrldiff.models.load_model('model.safetensors')`.")
    elif kind == "lora":
        use = ("```python\nfrom diffusers import DiffusionPipeline\n\n"
               f"pipe = DiffusionPipeline.from_pretrained({base_model!r})\n"
               "pipe.load_lora_weights(\"<this repo id or folder>\")\n```")
    else:
        use = ("```python\nfrom diffusers import DiffusionPipeline\n\n"
               "pipe = DiffusionPipeline.from_pretrained(\"<this repo id or folder>\")\n```")
    if cfg.sampler.reference_data_end:
        tau = final_eval.get("reference_below")
        when = f"{tau:.4g}" if isinstance(tau, int | float) else \
            "the midpoint of the training grid's last two interior times"
        rows.append(("data end", f"the base model at times <= {when} (sampler.reference_data_end)"))
        use += (f"\n\nThis fine-tune was trained to be used above time {when} only, with the base model at and below "
                "it (`sampler.reference_data_end`). `ctrldiff eval` of the run does this; the commands above do not.")
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    figure = "![same noise before and after fine-tuning](before_after.png)\n\n" if "before_after.png" in files else ""
    curve = "![reward, KL_path and J per epoch](reward_curve.png)\n\n" if "reward_curve.png" in files else ""
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# {cfg.algo} fine-tune of {base_model} for the reward {cfg.reward}\n\n"
            f"{what.capitalize()} of `{base_model}` trained with [ctrldiff](https://pypi.org/project/ctrldiff/) to "
            f"maximise J = E[r] - beta KL_path, the reward `{cfg.reward}` minus beta times the path KL divergence to "
            "the base model (Girsanov).\n\n| | |\n|---|---|\n" + table + "\n\n"
            "## Samples\n\nThe same noise through the base model (top) and this model (bottom); under each sample its "
            f"reward.\n\n{figure}{curve}## Use\n\n{use}\n\n"
            "The training config is in `config.yaml` (`ctrldiff train --config config.yaml` reruns it) and the held-out "
            "evaluation in `final_eval.json`.\n")


def export_run(run: str | Path, out: str | Path, base_model: str | None = None, overwrite: bool = False) -> list[Path]:
    """Write the hub-ready folder ``out`` for the finished run ``run``; returns the files written."""
    from .train.trainer import load_run_config

    run, out = Path(run), Path(out)
    if not (run / "config.yaml").is_file():
        raise CtrlDiffError(f"{run} is not a ctrldiff run directory (no config.yaml)")
    cfg = load_run_config(run)
    kind = _kind(run, cfg)
    weights = _check_finished(run, kind)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CtrlDiffError(f"{out} already holds files; pass --overwrite to replace them")
        shutil.rmtree(out)
    if base_model is None:
        base_model = cfg.model
        meta = run / "lora" / "ctrldiff.json"
        if meta.is_file():
            base_model = json.loads(meta.read_text()).get("base_model", base_model)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if kind == "lora":
            shutil.copy2(weights, out / weights.name)
        elif kind == "full":
            shutil.copytree(run / "pipeline", out, dirs_exist_ok=True)
        else:
            shutil.copy2(weights, out / "model.safetensors")
            shutil.copy2(run / "final_model.json", out / "model.json")
        for src, name in ((run / "samples" / "before_after.png", "before_after.png"),
                          (run / "reward_curve.png", "reward_curve.png"), (run / "config.yaml", "config.yaml"),
                          (run / "final_eval.json", "final_eval.json")):
            if src.exists():
                shutil.copy2(src, out / name)
        fe = json.loads((run / "final_eval.json").read_text()) if (run / "final_eval.json").exists() else {}
        files = sorted(p.name for p in out.iterdir())
        (out / "README.md").write_text(model_card(cfg, kind, base_model, fe, files), encoding="utf-8")
    except OSError as e:
        raise CtrlDiffError(f"cannot write the export into {out}: {e.strerror or e}") from None
    return sorted(out.iterdir())


@click.command("export")
@click.argument("run_dir", metavar="RUN")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (hub-ready).")
@click.option("--base-model", default=None, help="Hub id of the base model for the model card (default: the run's "
              "model; set it when the run used a local copy of a hub model).")
@click.option("--overwrite", is_flag=True, help="Replace the contents of an existing --out folder.")
def export_cmd(run_dir, out, base_model, overwrite) -> None:
    """Export a finished run as a folder for `huggingface-cli upload`: weights (diffusers LoRA format for
    diffusers runs), a README.md model card with the run's reward, algorithm, beta, KL_path and J, and the
    before/after samples."""
    from .models.diffusers_backend import looks_like_hub_id

    files = export_run(run_dir, out, base_model, overwrite)
    for f in files:
        click.echo(f"wrote {f}")
    card_base = base_model or ""
    if not card_base:
        text = (Path(out) / "README.md").read_text()
        card_base = yaml.safe_load(text.split("---")[1]).get("base_model", "")
    if not looks_like_hub_id(card_base) and card_base != "digits":
        click.echo(f"note: base_model {card_base!r} is not a hub id; pass --base-model OWNER/NAME before uploading",
                   err=True)
    click.echo(f"upload with: huggingface-cli upload <your-name>/<repo> {out}")
