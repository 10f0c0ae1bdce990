"""Typed configuration: pydantic models (unknown keys and wrong types are errors), YAML files and
``key.sub=value`` command-line overrides. Errors name the field and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import CtrlDiffError

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config section: unknown keys are rejected, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_validation_error(e: ValidationError, what: str = "config") -> str:
    msgs = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown key {loc!r}")
        else:
            got = err.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            msgs.append(f"{loc}: {err['msg']}{got}")
    return f"invalid {what}: " + "; ".join(msgs)


def parse_value(text: str) -> Any:
    """Parse an override value with YAML rules ('3' -> 3, 'true' -> True, '[1,2]' -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides to a nested dict (returns a new dict)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise CtrlDiffError(f"override {item!r} must look like key=value (e.g. ctrl.estimator=b)")
        key, _, val = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CtrlDiffError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = parse_value(val)
    return data


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise CtrlDiffError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CtrlDiffError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CtrlDiffError(f"config file {p} must hold a mapping of keys to values")
    return data


def build_config(cls: type[T], data: dict, what: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise CtrlDiffError(format_validation_error(e, what)) from None


def dump_yaml(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
