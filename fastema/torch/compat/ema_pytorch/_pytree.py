"""ema-pytorch 0.8.3's ``EMAPytree`` (also ``EMATensor``, and what ``EMA(tree)`` makes): the EMA
of a tensor, or of a tree of tensors."""
from __future__ import annotations

import copy as _copy

import torch
from torch import nn
from torch.utils import _pytree

from ....ops import cached_pairs
from ._base import _device_options, _lerp_towards, _Warmup


def _leaf_name(path: tuple) -> str:
    """``ema_pytree`` and the dotted path of a leaf (``ema_pytree.w``, ``ema_pytree.layers.0``): its
    ``state_dict()`` key."""
    parts = ["ema_pytree"]
    for k in path:
        for attr in ("key", "idx", "name"):          # MappingKey, SequenceKey, GetAttrKey (namedtuples)
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


class EMAPytree(_Warmup):
    """ema-pytorch 0.8.3's ``EMAPytree`` (also ``EMATensor``, and what ``EMA(tree)`` returns): the
    EMA of a tensor, or of a tree of tensors (nested dicts / lists / tuples / namedtuples, as
    ``torch.utils._pytree`` flattens them), with :class:`EMA`'s schedule (``beta``,
    ``update_after_step=100``, ``update_every=10``, ``inv_gamma``, ``power``, ``min_value``) and
    its buffers ``initted`` / ``step``::

        ema_tree <- lerp(ema_tree, tree, 1 - decay)     # each floating tensor leaf, at each due update

    ``ema_pytree`` (also ``ema_model``) is a deep copy of ``pytree`` (or the tree given as
    ``ema_pytree=``, or made by it when it is a function); ``ema()`` returns it (or calls it, when
    it is callable, as ema-pytorch does). The online tree is read again at every ``update()``, so
    a training loop that replaces its tensors (``params = {k: p - lr * g[k] ...}``) and writes
    the new ones into the same tree is followed. Each due update is one fastema launch per
    (device, dtype) group, bit for bit ``torch.lerp_`` (ema-pytorch's per-tensor loop), and reads
    no tensor value on the host.

    Deviations from ema-pytorch, on purpose:

    - ``state_dict()`` also holds the averaged tensors, under ``ema_pytree.<path>`` (``ema_pytree``
      alone for a bare tensor): ema-pytorch's holds only ``initted`` and ``step``, so its round
      trip loses the average. Its state dict loads into this class with ``strict=False`` (the
      counters; the average is kept as it is); a strict load of one says so and loads nothing.
      This one loads into ema-pytorch's with ``strict=False``.
    - A tree whose structure, tensor shapes or devices no longer match the EMA copy's is refused
      with the leaf's path, before anything changes (``step`` included); ema-pytorch pairs the
      leaves in order and fails midway, or averages the wrong pairs.
    - The warm-up settings are checked at construction, as :class:`EMA` checks them
      (``inv_gamma`` and ``power`` finite and > 0, ``min_value`` in [0, 1], ``update_after_step``
      an int >= 0); ema-pytorch takes a NaN or negative ``inv_gamma`` and averages NaN in.
    - Integer and bool tensor leaves are copied at each due update, never averaged
      (ema-pytorch's ``lerp_`` fails on them). Non-tensor leaves are left alone, as ema-pytorch does.
    - A tensor that sits at two places of the tree (a tied weight; the deep copy keeps it one
      tensor) is averaged once per update; ema-pytorch's loop averages it twice.
    - ``ema_pytree=`` given as a function (with no tensors of its own) is called, as its type hint
      says (ema-pytorch's check never calls it). A tree with no tensor, or an ``nn.Module`` (use
      :class:`EMA`), is refused; ``beta`` and ``update_every`` are checked.
    - ``allow_different_devices`` and ``coerce_dtype`` are accepted (pairs on two devices are
      averaged by torch, the kernels read any float dtype).
    """

    def __init__(self, pytree, ema_pytree=None, beta: float = 0.9999, update_after_step: int = 100,
                 update_every: int = 10, inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0,
                 allow_different_devices: bool = False, coerce_dtype: bool = False):
        super().__init__()
        self._init_warmup(beta, update_after_step, update_every, inv_gamma, power, min_value)
        if isinstance(pytree, nn.Module):
            raise TypeError("EMAPytree takes a tensor or a tree of tensors, got an nn.Module; use "
                            "fastema.torch.compat.EMA(model) for a module")
        with_paths, spec = _pytree.tree_flatten_with_path(pytree)
        self._spec = spec                                # the structure both trees keep
        self._tensor_at = [i for i, (_, leaf) in enumerate(with_paths) if torch.is_tensor(leaf)]
        if not self._tensor_at:
            raise ValueError(f"the tree has no tensor to average (its leaves: "
                             f"{[type(leaf).__name__ for _, leaf in with_paths][:8]}); pass a tensor or a "
                             f"dict / list / tuple of tensors")
        self._names = [_leaf_name(path) for path, _ in with_paths]
        names = [self._names[i] for i in self._tensor_at]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"two leaves of the tree have the same state_dict key {twice[0]!r} (keys such as "
                             f"'a.b' and 'a' -> 'b', or 1 and '1'); rename one")
        if ema_pytree is not None and callable(ema_pytree) and not any(
                torch.is_tensor(leaf) for leaf in _pytree.tree_leaves(ema_pytree)):
            ema_pytree = ema_pytree()                    # a function making the EMA copy
        if ema_pytree is None:
            try:
                ema_pytree = _copy.deepcopy(pytree)
            except Exception as err:
                raise TypeError(f"could not deepcopy the tree ({err}); pass ema_pytree= (a tree of the same "
                                f"structure, or a function returning one)") from err
        ema_leaves = _pytree.tree_leaves(ema_pytree)
        if len(ema_leaves) != len(with_paths):
            raise ValueError(f"ema_pytree= does not match pytree: {len(ema_leaves)} leaves, not {len(with_paths)}")
        self._float_at = [i for i in self._tensor_at if torch.is_tensor(ema_leaves[i]) and
                          (torch.is_floating_point(ema_leaves[i]) or torch.is_complex(ema_leaves[i]))]
        self._float_set = frozenset(self._float_at)
        self._other_at = [i for i in self._tensor_at if i not in self._float_set]
        _device_options(self, allow_different_devices, coerce_dtype)   # what _pairs reads
        try:
            self._pairs(ema_pytree, pytree)              # the EMA copy matches the tree
        except ValueError as err:
            raise ValueError(f"ema_pytree= does not match pytree: {err}") from None
        self.online_pytree = [pytree]                    # a list: never registered as a submodule
        self.__dict__["ema_pytree"] = ema_pytree         # a plain attribute (ema-pytorch's) even for a Parameter
        for leaf in _pytree.tree_leaves(ema_pytree):
            if torch.is_tensor(leaf):
                leaf.detach_()
        self._init_counters()

    @property
    def pytree(self):
        """The online tree (the one training changes)."""
        return self.online_pytree[0]

    @property
    def ema_model(self):
        """The averaged tree, ``ema_pytree`` (ema-pytorch's name for it on every class)."""
        return self.ema_pytree

    def _pairs(self, ma_tree, current_tree, what: str = "pytree") -> tuple[tuple, tuple]:
        """``(average, copy)``: ``(targets, sources, cached)`` of the floating tensor leaves of two
        trees of the recorded structure (``cached``: the PairShadow of an earlier update over
        the same memory in the same layout, else None) and ``(targets, sources)`` of the other
        tensor leaves; or a ``ValueError`` naming the first leaf that does not match (shapes are
        host metadata: no device read)."""
        ma, ma_spec = _pytree.tree_flatten(ma_tree)
        cur, cur_spec = _pytree.tree_flatten(current_tree)
        for name, spec, tree in ((what, cur_spec, current_tree), ("ema_pytree", ma_spec, ma_tree)):
            if spec != self._spec:
                raise self._structure_error(name, tree)
        avg_t, avg_s = [ma[i] for i in self._float_at], [cur[i] for i in self._float_at]
        copy_t, copy_s = [ma[i] for i in self._other_at], [cur[i] for i in self._other_at]
        # a hit: these tensors, in this layout, passed every check below at an earlier update
        cached = cached_pairs(avg_t, avg_s) if avg_t else None
        for i in (self._other_at if cached is not None else self._tensor_at):
            m, c = ma[i], cur[i]
            if not (torch.is_tensor(m) and torch.is_tensor(c)):
                raise ValueError(f"{self._names[i]} is a {type(c if torch.is_tensor(m) else m).__name__}, not a "
                                 f"tensor as when the EMA was made; keep the tree's tensors tensors")
            if m.shape != c.shape:
                raise ValueError(f"{self._names[i]} has shape {tuple(c.shape)} but its EMA copy {tuple(m.shape)}; "
                                 f"was the tree changed after the EMA was made? Make a new EMA")
            if m.device != c.device and not self.allow_different_devices:
                raise ValueError(f"{self._names[i]}: the EMA copy is on {m.device} and the tree on {c.device}; "
                                 f"pass allow_different_devices=True (as in ema-pytorch) or move them together")
            if (torch.is_floating_point(m) or torch.is_complex(m)) != (i in self._float_set):
                raise ValueError(f"{self._names[i]}'s EMA copy changed from a floating to an integer dtype or back "
                                 f"(now {m.dtype}); keep its dtype, or make a new EMA")
        return (avg_t, avg_s, cached), (copy_t, copy_s)

    def _structure_error(self, name: str, tree) -> ValueError:
        """What changed in ``tree``'s structure, in leaf paths (a few of each), as an error."""
        now = [_leaf_name(path) for path, _ in _pytree.tree_flatten_with_path(tree)[0]]
        gone = [n for n in self._names if n not in set(now)][:3]
        new = [n for n in now if n not in set(self._names)][:3]
        what = (f"gone: {gone}; new: {new}" if gone or new else
                "the same paths in other containers (a list that became a tuple, reordered keys, ...)")
        return ValueError(f"the structure of {name} changed since the EMA was made ({what}); keep the tree's "
                          f"keys and nesting, or make a new EMA")

    @staticmethod
    @torch.no_grad()
    def _copy(targets: list, sources: list) -> None:
        same = [(t, s) for t, s in zip(targets, sources) if t.device == s.device]
        if same:
            torch._foreach_copy_([t for t, _ in same], [s for _, s in same])
        for t, s in zip(targets, sources):
            if t.device != s.device:
                t.copy_(s)

    def copy_params_from_pytree_to_ema(self) -> None:
        """Copy every tensor of the tree into the EMA copy (the first update and the warm-up do)."""
        average, copy = self._pairs(self.ema_pytree, self.pytree)
        self._copy(average[0] + copy[0], average[1] + copy[1])

    def update(self) -> None:
        """ema-pytorch's ``update()``: the first call copies the tree; then every ``update_every``-th
        call copies it until ``update_after_step``, and averages it after. A tree that no longer
        matches is refused before the step counter moves."""
        average, copy = self._pairs(self.ema_pytree, self.pytree)
        step, phase = self._phase()
        decay = self._due_decay(step) if phase == "average" and not self.is_frozen else None   # (refused: no step)
        self._advance()
        if phase in ("init", "copy"):
            self._copy(average[0] + copy[0], average[1] + copy[1])
            if phase == "init":
                self._mark_initted()
        elif phase == "average":
            self._move(average, copy, decay)

    def update_moving_average(self, ma_pytree, current_pytree, current_decay: float | None = None) -> None:
        """``ma_pytree <- lerp(ma_pytree, current_pytree, 1 - decay)`` for two trees of the EMA's
        structure (``decay``: ``current_decay``, else :meth:`get_current_decay`)."""
        if self.is_frozen:
            return
        self._move(*self._pairs(ma_pytree, current_pytree), current_decay)

    def _move(self, average: tuple, copy: tuple, decay: float | None) -> None:
        if self.is_frozen:
            return
        decay = self.get_current_decay() if decay is None else decay
        targets, sources, cached = average
        _lerp_towards(targets, sources, decay, cached)
        if copy[0]:
            self._copy(*copy)

    def __call__(self, *args, **kwargs):
        if callable(self.ema_pytree):
            return self.ema_pytree(*args, **kwargs)
        return self.ema_pytree

    # state_dict: initted, step (ema-pytorch's keys), then ema_pytree.<path> for each tensor leaf

    def _leaves(self) -> list:
        """``[(key, tensor)]`` of the EMA copy's tensor leaves."""
        leaves, spec = _pytree.tree_flatten(self.ema_pytree)
        if spec != self._spec:
            raise self._structure_error("ema_pytree", self.ema_pytree)
        return [(self._names[i], leaves[i]) for i in self._tensor_at]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self._leaves():
            destination[prefix + name] = t if keep_vars else t.detach()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: every key is checked (presence under
        ``strict``, tensors, shapes) before ``initted``, ``step`` or an averaged tensor is written.
        ``strict=False`` takes ema-pytorch's state dict (``initted`` and ``step`` only)."""
        self._strict_load: bool | None = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._strict_load = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch passes strict=True here whatever the caller asked; load_state_dict above says it
        strict = getattr(self, "_strict_load", None)
        mine = [("initted", self.initted), ("step", self.step)] + self._leaves()
        expected = {prefix + name for name, _ in mine}
        errors, missing = [], []
        for name, t in mine:
            key = prefix + name
            if key not in state_dict:
                missing.append(key)
                continue
            value = state_dict[key]
            if not torch.is_tensor(value):
                errors.append(f"{key} is a {type(value).__name__}, not a tensor")
            elif value.shape != t.shape:
                errors.append(f"size mismatch for {key}: copying a tensor with shape {tuple(value.shape)} from "
                              f"the checkpoint, the shape in the EMA is {tuple(t.shape)}")
        unexpected = [k for k in state_dict if k.startswith(prefix) and k not in expected]
        missing_keys.extend(missing)                      # torch raises on them when the load is strict
        unexpected_keys.extend(unexpected)
        if strict and len([k for k in missing if k not in (prefix + "initted", prefix + "step")]) == len(mine) - 2:
            errors.append("the state dict holds no averaged tensor (ema-pytorch's EMAPytree saves only initted "
                          "and step): nothing was loaded; pass strict=False to load the counters and keep the "
                          "average as it is, or load a state dict of fastema's EMAPytree")
        error_msgs.extend(errors)
        if errors or (strict and (missing or unexpected)):
            return                                        # nothing of this module was changed
        with torch.no_grad():
            for name, t in mine:
                if prefix + name in state_dict:
                    t.copy_(state_dict[prefix + name])
        self._host = None                                 # step / initted changed: read them again once


EMATensor = EMAPytree
