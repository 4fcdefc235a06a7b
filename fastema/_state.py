"""What a fastema checkpoint must contain, checked in one place: the header every state dict
starts with (:func:`check_header`) and the one refusal that says nothing was loaded
(:func:`refuse_load`). Model averages, framework EMAs, smoothers and trackers all use them."""
from __future__ import annotations

__all__ = ["check_header", "refuse_load"]


def check_header(state, fmt: str, version: int | tuple, hint: str) -> None:
    """The one checkpoint header rule: ``state`` is a dict whose ``format`` is ``fmt`` and whose
    ``version`` is ``version`` (or one of them); else ValueError saying what it is and, with ``hint``,
    what to do.
    Every fastema checkpoint (model averages, framework EMAs, smoothers) starts with it."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a {fmt} state dict (format={found!r}); {hint}")
    versions = version if isinstance(version, tuple) else (version,)
    if state.get("version") not in versions:
        raise ValueError(f"{fmt} checkpoint version {state.get('version')!r} is not supported "
                         f"(expected {' or '.join(map(str, versions))})")


def refuse_load(what: str, problems: list[str], against: str = "") -> None:
    """ValueError listing ``problems`` (when there are any) of a ``what`` checkpoint (``against``: what
    it was held against, e.g. ``" this model"``); the caller has written nothing yet, and the
    message says so."""
    if problems:
        raise ValueError(f"{what} checkpoint does not match{against}: " + "; ".join(problems) +
                         ". Nothing was loaded.")
