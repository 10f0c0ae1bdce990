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
        raise CtrlDiffError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
    return value
