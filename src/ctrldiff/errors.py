"""User-facing errors.

Anything the user can fix (bad config value, missing file, wrong shape, unknown name) raises
:class:`CtrlDiffError`. The CLI prints it as one line and exits non-zero, with no traceback.
"""

from __future__ import annotations


class CtrlDiffError(Exception):
    """An error caused by user input; its message names the problem and what is allowed."""


class RewardError(CtrlDiffError):
    """A reward returned something unusable (NaN/inf, wrong shape or dtype) or raised."""


def check(cond: bool, msg: str) -> None:
    """Raise :class:`CtrlDiffError` with ``msg`` unless ``cond`` holds."""
    if not cond:
        raise CtrlDiffError(msg)


def choice(name: str, value: str, allowed) -> str:
    """Validate ``value`` against ``allowed`` names and return it; the error lists the choices."""
    allowed = sorted(allowed)
    if value not in allowed:
        raise CtrlDiffError(f"unknown {name} {value!r}{did_you_mean(value, allowed)}; choose one of: {', '.join(allowed)}")
    return value


def did_you_mean(value: str, names) -> str:
    """'; did you mean 'x'?' for the closest of ``names`` to a mistyped ``value`` (difflib), or ''."""
    import difflib

    near = difflib.get_close_matches(str(value), [str(n) for n in names], n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""
