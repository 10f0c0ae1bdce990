"""``ctrldiff config``: the full default training config of an algorithm as commented YAML."""

from __future__ import annotations

import textwrap
import typing

import click
import yaml
from pydantic import BaseModel

# the config section each algorithm reads (besides the common ones)
ALGO_SECTIONS = {"ctrl": "ctrl", "ddpo": "ddpo", "ddpo-sf": "ddpo", "dpok": "dpok", "q-learning": "qlearning",
                 "reward-backprop": "reward_backprop", "diffusion-dpo": "diffusion_dpo", "lasro": "lasro"}
COMMON_SECTIONS = ("sampler", "optim", "log", "diffusers")
# where the plain defaults do not make a valid config for an algorithm: the setting its docs start from
ALGO_DEFAULTS = {"lasro": {"model": "digits-2step", "sampler": {"solver": "ddim", "steps": 2, "eta": 0.0}}}
WIDTH = 118


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _choices(annotation) -> list | None:
    """The allowed values of a Literal field (also inside Optional / list)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return None


def _comment(text: str, indent: str) -> list[str]:
    return [indent + "# " + line for line in textwrap.wrap(text, WIDTH - len(indent) - 2, break_on_hyphens=False)]


def _section_lines(model: BaseModel, indent: str = "") -> list[str]:
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        desc = field.description or ""
        choices = _choices(field.annotation)
        if choices and not isinstance(value, BaseModel):
            desc = (desc + "; " if desc else "") + "one of: " + ", ".join(str(c) for c in choices)
        if desc:
            lines += _comment(desc, indent)
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines += _section_lines(value, indent + "  ")
        else:
            lines.append(f"{indent}{name}: {_scalar(value)}")
    return lines


def config_yaml(algo: str = "ctrl", all_sections: bool = False) -> str:
    """The default TrainConfig of ``algo`` as YAML with every field's description as a comment; other algorithms'
    sections are left out unless ``all_sections``. Loading the text gives back the same config."""
    from .errors import choice
    from .train.config import ALGOS, TrainConfig

    choice("--algo", algo, ALGOS)
    cfg = TrainConfig(algo=algo, **ALGO_DEFAULTS.get(algo, {}))
    own = ALGO_SECTIONS[algo]
    skipped = sorted({s for s in ALGO_SECTIONS.values() if s != own})
    head = [f"# ctrldiff train config: every field with its default for --algo {algo}.",
            "# Save it, edit what you need (delete the rest) and run: ctrldiff train --config my.yaml",
            "# Any field can also be set on the command line: --set section.field=value"]
    if algo in ALGO_DEFAULTS:
        head.append(f"# For {algo} the plain defaults are not a valid setup; set here: {ALGO_DEFAULTS[algo]}")
    if not all_sections:
        head.append(f"# Left out (other algorithms' sections): {', '.join(skipped)}; `ctrldiff config --all` shows them.")
    lines = list(head)
    for name, field in TrainConfig.model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel) and not all_sections and name not in COMMON_SECTIONS and name != own:
            continue
        desc = field.description or ""
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip()
            desc = desc or (doc.splitlines()[0] if doc and not doc.startswith("Base for") else "")
            if name == "diffusers":
                desc = "diffusers pipelines only (model: a pipeline directory or hub id)"
            lines.append("")
            lines += _comment(desc, "") if desc else []
            lines.append(f"{name}:")
            lines += _section_lines(value, "  ")
        else:
            choices = _choices(field.annotation)
            if choices:
                desc = (desc + "; " if desc else "") + "one of: " + ", ".join(str(c) for c in choices)
            lines += _comment(desc, "") if desc else []
            lines.append(f"{name}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


@click.command("config")
@click.option("--algo", default="ctrl", show_default=True, help="Algorithm whose defaults to print.")
@click.option("--all", "all_sections", is_flag=True, help="Also print the other algorithms' sections.")
def config_cmd(algo, all_sections) -> None:
    """Print the full default training config for an algorithm as YAML, each field with its description
    (save it as a file for `ctrldiff train --config FILE`)."""
    click.echo(config_yaml(algo, all_sections), nl=False)
