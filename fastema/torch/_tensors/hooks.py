"""Watching a torch model and reading its names: the registration hooks and the names and patterns.

- Registration hooks (:func:`registration_hooks`): process-wide torch hooks that mark the owners
  watching a module stale (``owner.stale = True``) when a parameter, buffer or submodule is
  registered on it (:data:`HOOKS` while installed), and restart a model average from rank 0's
  weights after a ``DistributedDataParallel`` wrap (an owner's ``resync`` flag and ``restart``);
  :func:`watch`; without the hooks, :func:`tables_of` / :func:`tables_changed` compare the
  modules' tables instead.
- Names and patterns: wrapper prefixes (:func:`normalize_name`, :func:`unwrap`), ``exclude=`` /
  ``copy=`` patterns (:func:`patterns`, :func:`matches`), checkpoint name matching
  (:func:`match_names`).
"""
from __future__ import annotations

import fnmatch
import warnings
import weakref
from typing import Callable, Sequence

from torch import nn

__all__ = ["HOOKS", "match_names", "matches", "normalize_name", "patterns", "registration_hooks", "tables_changed",
           "tables_of", "unsynced", "unwrap", "watch"]

_PREFIXES = ("module.", "_orig_mod.")        # DistributedDataParallel, torch.compile


def normalize_name(name: str) -> str:
    """Strip the wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of torch.compile)."""
    stripped = True
    while stripped:
        stripped = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p):], True
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP, DataParallel, DeepSpeed and ``torch.compile`` wrappers (nested ones
    too): what an average of ``model`` tracks and writes into (Accelerate's ``unwrap_model``)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None)
                                                      if type(model).__name__ in ("DistributedDataParallel",
                                                                                  "DataParallel",
                                                                                  "DeepSpeedEngine") else None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# Models are watched for parameters, buffers or submodules registered after the EMA
# was made (load_state_dict(assign=True), module.weight = nn.Parameter(...),
# model[0] = nn.Linear(...)): torch calls these global hooks, which mark the EMA
# stale; update() then re-reads the model. The per-step cost is one flag check (beside the
# address check of the tracked slots, _slots.Slots.unchanged, which hooks cannot replace).


_WATCHED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
HOOKS: list = []                  # handles of the process-wide registration hooks, while installed
_HOOKS_WANTED = True


def registration_hooks(enabled: bool) -> None:
    """Install (``True``, the default) or remove (``False``) fastema's process-wide hooks.

    fastema registers three global torch hooks (``register_module_parameter_registration_hook``
    and the buffer and module twins) at the first model average; each call only sets a flag
    on the averages watching that module. Without them an average still follows tensors and
    submodules replaced in the model and refuses tensors added to it, at a cost per update: it
    checks each module on the way to a tracked tensor, and compares every module's parameter,
    buffer and submodule tables with the last update's (a ``len()`` per table and an identity per
    submodule; a walk of the names only when one changed). On a 391-module model ``update()``
    takes about 126 us instead of 72. And an average made before ``DDP(model)`` is no longer
    restarted from rank 0's weights: make it after the wrap.
    """
    global _HOOKS_WANTED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    _HOOKS_WANTED = enabled
    if enabled:
        _install_hooks()
    else:
        while HOOKS:
            HOOKS.pop().remove()


def _install_hooks() -> None:
    if HOOKS or not _HOOKS_WANTED:
        return
    from torch.nn.modules import module as M

    HOOKS.extend([M.register_module_parameter_registration_hook(_on_registration),
                   M.register_module_buffer_registration_hook(_on_registration),
                   M.register_module_module_registration_hook(_on_registration)])


def _on_registration(module, name, value):
    emas = _WATCHED.get(module)
    if emas:
        for ema in emas:
            ema.stale = True
    if name == "module" and isinstance(value, nn.Module) and type(module).__name__ == "DistributedDataParallel":
        _wrapped_in_ddp(value)
    return None


def _wrapped_in_ddp(model: nn.Module) -> None:
    # DistributedDataParallel(model) broadcasts rank 0's weights into the model in place right
    # after this registration. An average made before that holds this rank's own initial
    # weights, so the ranks' averages would differ for good: every owner watching the model that
    # has a ``resync`` flag (a model average's side, ModelEmaV3) gets it set, and its
    # ``restart(model)`` runs at the model's first forward (DDP's forward calls it before any
    # training); an owner reads its flag at its next read too, if that comes first. An owner
    # starts over only if nothing but its construction went into it yet, and warns otherwise.
    owners: list = []
    for m in model.modules():
        for owner in list(_WATCHED.get(m, ())):
            if owner not in owners and hasattr(owner, "resync"):   # a target network: nothing to restart
                owner.resync = True
                owners.append(owner)
    if not owners:
        return
    handle: list = []

    def restart(module, args):
        handle.pop().remove()
        for owner in owners:
            owner.restart(module)

    handle.append(model.register_forward_pre_hook(restart))


def unsynced(kind: str) -> None:
    """The warning of an average that was updated before the model was wrapped in DDP."""
    warnings.warn(f"{kind} was made and updated before the model was wrapped in DistributedDataParallel, which "
                  f"replaced this rank's weights with rank 0's; the ranks' averages may differ. Make the average "
                  f"after DDP(model).", RuntimeWarning, stacklevel=3)


def watch(models, owner) -> None:
    """Mark ``owner`` stale (``owner.stale = True``) whenever a parameter, buffer or submodule is
    registered on a module of ``models``, while the registration hooks are installed. An owner
    with a ``resync`` flag and a ``restart(model)`` method (a model average's side) is also
    restarted from rank 0's weights after a DistributedDataParallel wrap: the flag set at the
    wrap, ``restart`` called at the model's first forward (:func:`_wrapped_in_ddp`)."""
    _install_hooks()
    for model in models:
        for m in model.modules():
            _WATCHED.setdefault(m, weakref.WeakSet()).add(owner)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def names_of(module: nn.Module, normal: Callable[[str], str] = str) -> dict[int, list[str]]:
    """``id(tensor) -> every name it has in module`` (``normal`` of each): ``named_parameters()``
    gives a tie's first name only, and a pattern that names it under another selects it too."""
    out: dict[int, list[str]] = {}
    for named in (module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)):
        for name, t in named:
            out.setdefault(id(t), []).append(normal(name))
    return out


def any_matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """Whether one of ``names`` (a tensor's: :func:`names_of`) matches one of ``patterns``."""
    return any(matches(n, patterns) for n in names)


def patterns(what: str, value) -> tuple[str, ...]:
    """``exclude=`` / ``copy=`` as a tuple of fnmatch patterns; a single str is one pattern."""
    if isinstance(value, str):
        return (value,)
    try:
        found = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a list of name patterns, e.g. {what}=['head.*'], "
                        f"got {type(value).__name__}") from None
    bad = [p for p in found if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must hold name patterns (str), got {bad[0]!r}")
    return found


def tables_of(*models: nn.Module) -> tuple:
    """``(tables, their lengths, submodules)`` of every module of ``models``: its ``_parameters``,
    ``_buffers`` and ``_modules`` dicts, in that order, and what the ``_modules`` dicts hold."""
    mods = [m for model in models for m in model.modules()]
    tables = [t for m in mods for t in (m._parameters, m._buffers, m._modules)]
    return tables, list(map(len, tables)), [c for m in mods for c in m._modules.values()]


def tables_changed(before: tuple | None) -> bool:
    """Whether a module of :func:`tables_of`'s ``before`` holds more or fewer parameters, buffers or
    submodules, or another submodule, now (a ``len()`` per table and an identity per submodule,
    about a tenth of a name walk); True for no ``before``."""
    if before is None:
        return True
    tables, counts, children = before
    return list(map(len, tables)) != counts or [c for t in tables[2::3] for c in t.values()] != children


def match_names(saved: dict, wanted: Sequence[str]) -> tuple[dict, list[str]]:
    """``wanted name -> saved value``: exact names first, then names with DDP / torch.compile
    prefixes stripped (checkpoints of a wrapped model). Returns ``(matched, unused saved keys)``."""
    matched = {n: saved[n] for n in wanted if n in saved}
    unused = [k for k in saved if k not in matched]
    for k in list(unused):
        n = normalize_name(k)
        if n != k and n in wanted and n not in matched:
            matched[n] = saved[k]
            unused.remove(k)
    return matched, unused
