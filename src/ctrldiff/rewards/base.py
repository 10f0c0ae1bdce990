"""The reward protocol, the registry of built-in rewards, weighted sums and call checking.

A reward is a batched callable ``reward(x, cond) -> Tensor[B]`` with two attributes:
``name`` (str) and ``differentiable`` (bool: gradients w.r.t. x are meaningful).
Rewards are built from a spec string:
  * a built-in name (``ctrldiff.rewards.available()``), optionally with arguments
    ``NAME:key=value;key=value`` (``aesthetic:path=/weights/aesthetic``, ``pickscore:model=/w/pickscore``);
    a first item without ``=`` is the factory's main argument (``remote:http://127.0.0.1:8000;timeout=30``),
  * ``module:function`` — an import path to the user's own callable, or a factory returning one,
  * a weighted sum ``"1.0*digit-alignment + 0.1*jpeg-compressibility"``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import CtrlDiffError, RewardError


@runtime_checkable
class Reward(Protocol):
    name: str
    differentiable: bool

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor: ...


class FunctionReward:
    """Wrap a plain function ``fn(x, cond) -> [B]`` (or ``fn(x) -> [B]``) as a Reward."""

    def __init__(self, fn: Callable, name: str, differentiable: bool = False):
        self.fn, self.name, self.differentiable = fn, name, differentiable
        try:
            import inspect

            self._takes_cond = len(inspect.signature(fn).parameters) >= 2
        except (TypeError, ValueError):
            self._takes_cond = True

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.fn(x, cond) if self._takes_cond else self.fn(x)

    def __repr__(self) -> str:
        return f"FunctionReward({self.name})"


class WeightedSum:
    """sum_i w_i r_i(x, c); differentiable only if every term is."""

    def __init__(self, terms: list[tuple[float, Reward]]):
        if not terms:
            raise CtrlDiffError("a weighted reward needs at least one term")
        self.terms = terms
        self.name = " + ".join(f"{w:g}*{r.name}" for w, r in terms)
        self.differentiable = all(r.differentiable for _, r in terms)

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return sum(w * check_reward_output(r, r(x, cond), x.shape[0]) for w, r in self.terms)


# ---- registry ---------------------------------------------------------------------------------
_BUILTINS: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str):
    """Register a factory ``factory(**kwargs) -> Reward`` under ``name``."""

    def deco(factory):
        _BUILTINS[name] = factory
        return factory

    return deco


def _load_builtins() -> None:
    # importing these modules registers their rewards; none of them needs a GPU or a download
    from . import builtin, remote  # noqa: F401
    from . import models as _models  # noqa: F401  (model rewards: registering them imports no transformers)


def available() -> list[str]:
    _load_builtins()
    return sorted(_BUILTINS)


_TERM = re.compile(r"^\s*(?:(?P<w>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*\*\s*)?(?P<name>[\w.\-]+(?::[^\s*]*)?)\s*$")
_KEY = re.compile(r"^[A-Za-z_]\w*$")


def parse_reward_args(name: str, text: str) -> tuple[list[str], dict[str, object]]:
    """``"a;k=v;k2=3"`` -> (["a"], {"k": "v", "k2": 3}): items split at ``;``; a first item that is not
    ``key=value`` is positional; values that read as int / float / true / false become those."""
    args: list[str] = []
    kwargs: dict[str, object] = {}
    for i, item in enumerate(p for p in text.split(";") if p.strip()):
        key, eq, val = item.partition("=")
        if not eq or not _KEY.match(key.strip()):
            if i == 0:
                args.append(item.strip())
                continue
            raise CtrlDiffError(f"reward {name!r}: argument {item!r} must look like key=value")
        key = key.strip()
        if key in kwargs:
            raise CtrlDiffError(f"reward {name!r}: argument {key!r} is given twice")
        kwargs[key] = _arg_value(val.strip())
    return args, kwargs


def _arg_value(v: str) -> object:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def make_reward(spec: str | Reward | Callable, **kwargs) -> Reward:
    """Build a reward from a spec string (see module docstring) or pass a Reward through."""
    if not isinstance(spec, str):
        if isinstance(spec, Reward):
            return spec
        if callable(spec):
            return FunctionReward(spec, getattr(spec, "__name__", "reward"), getattr(spec, "differentiable", False))
        raise CtrlDiffError(f"reward must be a name, 'module:function' or a callable, got {type(spec).__name__}")
    parts = [p for p in re.split(r"\s+\+\s+|\s*,\s*", spec.strip()) if p]
    if len(parts) > 1 or (parts and "*" in parts[0]):
        terms = []
        for p in parts:
            m = _TERM.match(p)
            if not m:
                raise CtrlDiffError(f"cannot parse reward term {p!r}; write e.g. '0.5*jpeg-compressibility'")
            terms.append((float(m["w"]) if m["w"] else 1.0, make_reward(m["name"], **kwargs)))
        return terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else WeightedSum(terms)
    name = spec.strip()
    _load_builtins()
    if name in _BUILTINS:
        return _BUILTINS[name](**kwargs)
    head, sep, rest = name.partition(":")
    if sep and head in _BUILTINS:
        import inspect

        args, kw = parse_reward_args(head, rest)
        factory = _BUILTINS[head]
        sig = inspect.signature(factory)
        takes = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in kw if k not in takes]
        try:
            if unknown:
                raise TypeError(f"unknown argument(s) {', '.join(unknown)}")
            sig.bind(*args, **kw, **kwargs)
        except TypeError as e:
            raise CtrlDiffError(f"reward {head!r}: bad arguments {rest!r} ({e}); it takes: "
                                f"{', '.join(takes) or 'no arguments'}") from None
        return factory(*args, **kw, **kwargs)
    if sep:
        return _import_reward(name)
    from ..errors import did_you_mean

    raise CtrlDiffError(f"unknown reward {name!r}{did_you_mean(name, available())}; use one of: {', '.join(available())}, "
                        "or 'module:function' for your own callable")


def _import_reward(path: str) -> Reward:
    mod_name, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise CtrlDiffError(f"cannot import reward {path!r}: {e}") from None
    if isinstance(obj, type) or (callable(obj) and getattr(obj, "is_reward_factory", False)):
        obj = obj()
    if not callable(obj):
        raise CtrlDiffError(f"reward {path!r} is not callable")
    if isinstance(obj, Reward):
        return obj
    return FunctionReward(obj, path, getattr(obj, "differentiable", False))


# ---- checking what a reward returns -------------------------------------------------------------
def check_reward_output(reward: Reward, out, batch: int, batch_index: int | str | None = None) -> Tensor:
    """Validate a reward's output: a float tensor of shape [batch] with finite values.

    Raises :class:`RewardError` naming the reward (and the batch) otherwise.
    """
    where = f"reward {reward.name!r}" + (f" on batch {batch_index}" if batch_index is not None else "")
    if not isinstance(out, Tensor):
        try:
            out = torch.as_tensor(out)
        except Exception:  # noqa: BLE001
            raise RewardError(f"{where} returned {type(out).__name__}, expected a tensor of shape [{batch}]") from None
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if tuple(out.shape) != (batch,):
        raise RewardError(f"{where} returned shape {tuple(out.shape)}, expected [{batch}]")
    if not (out.dtype.is_floating_point or out.dtype in (torch.int32, torch.int64, torch.bool, torch.uint8)):
        raise RewardError(f"{where} returned dtype {out.dtype}, expected a real number per sample")
    out = out.float() if not out.dtype.is_floating_point else out
    bad = ~torch.isfinite(out)
    if bad.any():
        raise RewardError(f"{where} returned {int(bad.sum())} non-finite value(s) (NaN/inf) out of {batch}")
    return out


def call_reward(reward: Reward, x: Tensor, cond: Tensor | None, batch_index: int | str | None = None,
                grad: bool = False) -> Tensor:
    """Call ``reward`` and check its output; exceptions inside the reward become RewardError."""
    try:
        with torch.set_grad_enabled(grad):
            out = reward(x, cond)
    except CtrlDiffError as e:
        if batch_index is None:
            raise
        # e.g. a remote reward that gave up after its retries: say which reward and which batch
        where = f"reward {reward.name!r} on batch {batch_index}"
        raise (RewardError if isinstance(e, RewardError) else CtrlDiffError)(f"{where}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the user's reward raised: name it
        where = f"reward {reward.name!r}" + (f" on batch {batch_index}" if batch_index is not None else "")
        raise RewardError(f"{where} raised {type(e).__name__}: {e}") from e
    return check_reward_output(reward, out, x.shape[0], batch_index)
