"""Typed configuration: pydantic models (unknown keys and wrong types are errors), YAML files and
``key.sub=value`` command-line overrides. Errors name the field and what is allowed."""

from __future__ import annotations

import difflib
import os
import reprlib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import CtrlDiffError

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config section: unknown keys are rejected, values validated on assignment, and
    nan/inf are not numbers any field accepts (``lr=.inf`` would only fail later, deep inside training)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 2, 60, 60, 4, 4


def _section_keys(cls: type[BaseModel] | None, path: tuple) -> list[str] | None:
    """Field names of the config section at ``path`` inside ``cls`` (None if that is not a section)."""
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part) if isinstance(part, str) else None
        cls = field.annotation if field is not None else None
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return None


def format_validation_error(e: ValidationError, what: str = "config", cls: type[BaseModel] | None = None) -> str:
    """One line naming each bad field and what it allows (for unknown keys: the keys that section takes)."""
    msgs: list = []
    unknown: dict[tuple, list] = {}  # section -> its unknown keys, reported together with the keys it takes
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            section = tuple(err["loc"][:-1])
            if section not in unknown:
                unknown[section] = []
                msgs.append(section)
            unknown[section].append(err["loc"][-1])
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            hint = ""
            if err["type"] == "literal_error" and isinstance(got, str):
                expected = str(err.get("ctx", {}).get("expected", "")).replace(" or ", ", ")
                options = [o.strip().strip("'") for o in expected.split(", ")]
                near = difflib.get_close_matches(got, options, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
            got = "" if isinstance(got, dict) or not loc else f" (got {_short.repr(got)})"
            msgs.append(f"{loc}: {msg}{got}{hint}" if loc else msg)
    for i, m in enumerate(msgs):
        if isinstance(m, tuple):
            names = [".".join(str(p) for p in (*m, k)) for k in unknown[m]]
            text = f"unknown key{'s' if len(names) > 1 else ''} " + ", ".join(_short.repr(n) for n in names[:8])
            text += f" and {len(names) - 8} more" if len(names) > 8 else ""
            keys = _section_keys(cls, m)
            if keys:
                near = [difflib.get_close_matches(str(k), keys, n=1) for k in unknown[m]]
                hints = [f"{c[0]!r}" if len(near) == 1 else f"{_short.repr(k)} -> {c[0]!r}"
                         for k, c in zip(unknown[m], near, strict=True) if c]
                text += (f" ({'.'.join(map(str, m)) or what} takes: {', '.join(keys)}"
                         + (f"; did you mean {', '.join(hints)}?" if hints else "") + ")")
            msgs[i] = text
    return f"invalid {what}: " + "; ".join(msgs)


def parse_value(text: str) -> Any:
    """Parse an override value with YAML rules ('3' -> 3, 'true' -> True, '[1,2]' -> list)."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise CtrlDiffError(f"value {text[:40]!r}... is nested too deeply") from None
    except Exception:  # noqa: BLE001 - YAMLError, and what PyYAML's constructors raise for values such as
        return text  # '2001-13-45' or '!!float abc' (ValueError, KeyError, ...): then it is a plain string


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
        raise CtrlDiffError(f"config file {p} is not valid YAML: {yaml_error_text(e)}") from None
    except UnicodeDecodeError:
        raise CtrlDiffError(f"config file {p} is not a text (UTF-8) file") from None
    except RecursionError:
        raise CtrlDiffError(f"config file {p} is nested too deeply") from None
    except OSError as e:
        raise CtrlDiffError(f"cannot read config file {p}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - PyYAML's constructors raise ValueError etc. for e.g. 'a: 2001-13-45'
        why = (str(e).splitlines() or [""])[0][:200]
        raise CtrlDiffError(f"config file {p} is not valid YAML: {type(e).__name__}: {why}") from None
    if not isinstance(data, dict):
        raise CtrlDiffError(f"config file {p} must hold a mapping of keys to values")
    return data


def yaml_error_text(e: Exception) -> str:
    """A PyYAML error as 'line L, column C: problem (context at line L2)' (lines and columns from 1)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or (str(e).splitlines() or ["syntax error"])[0]
    if mark is None:
        return problem
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and cmark is not None and cmark.line != mark.line:
        text += f" ({ctx} started at line {cmark.line + 1})"
    return text


def build_config(cls: type[T], data: dict, what: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise CtrlDiffError(format_validation_error(e, what, cls)) from None
    except RecursionError:
        raise CtrlDiffError(f"invalid {what}: nested too deeply") from None


def dump_yaml(cfg: BaseModel, path: str | Path) -> None:
    """Write atomically (temp file, fsync, rename): a kill mid-write must not leave a truncated config.yaml,
    which a resume would silently complete with default values."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
