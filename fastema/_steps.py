"""StepLaunches: the per-step launches of a shadow made of launch groups, each kept by its group.

:class:`fastema.FlatShadow` (fastema's own flat buffers) and :class:`fastema.pairs.PairShadow`
(the caller's tensors, paired) differ in where the average lives, not in how an update runs:
one launch per group, behind an optional skip flag, with the weights on the host or in a
device plan. This class is that part, written once. A subclass provides ``layout.groups``
(launch groups, :class:`fastema._launch.Launches`, plus ``framework``), ``rows``, ``skipped``
and ``_views`` (a dict, empty at first: the made-here flags' kernel views). Each group keeps its
launches (``g.launch(op, **fixed)``), which read the group's tables at every call: nothing here
watches the tables.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _backends, _launch
from ._checks import sr_key
from ._shadow import LaunchLayout


class _Flagged(NamedTuple):
    """A flag fastema made (``_backends.made_here``), viewed once, and the specs of the launches
    behind it (``group.launch_of``): the lerp's (nearest, stochastic), the scan's, the copy's."""
    flag: Any
    lerp: tuple[_launch.Spec, _launch.Spec]
    scan: _launch.Spec
    copy: _launch.Spec


_VIEWS_KEPT = 8       # flags viewed a shadow (one a device a plan or scan; a few more where they change)

LERP = (_launch.spec("lerp"), _launch.spec("lerp", stochastic=True))
"""The per-step lerp's launch specs, by stochastic rounding: ``group.launch_of(LERP[stochastic])``."""


@functools.lru_cache(maxsize=None)
def _copy_in(rows: int) -> _launch.Spec:
    return _launch.spec("copy", to_shadow=True, row_lo=0, row_hi=rows)


class StepLaunches:
    """The checked update, the non-finite scan and the copy from the sources, one launch per
    group, each prepared once per op, rounding, flag and carried plan, and kept by the group."""

    layout: LaunchLayout
    rows: int
    skipped: dict
    _views: dict
    _plan_kept: tuple | None = None     # (plan, groups, stochastic, carriers, its launches): update_checked's

    def update_checked(self, weights_by_device: dict | None, rounding: str, seed: int, step: int, skip_if,
                       plan=None, given: int | None = None) -> None:
        """The launches of an update whose arguments are checked and whose addresses are current
        (the model averages check the addresses themselves, in one pass with the model's own
        tensors). ``weights_by_device``: :func:`fastema._checks.resolve_weights` per device; or
        ``plan``, a :class:`fastema.average._device_plan.DevicePlan` whose device arrays hold the
        weights and the rounding keys (``seed`` and ``step`` unused). ``given`` (with ``plan``, and
        ``skip_if`` the plan's own ``flags``: the launches are bound to them once, ``skip_if`` not
        read again): this call's plan step (the training step, -1 for the update count) rides in the
        first launch of each device the plan lists in ``carriers`` (one ``"plan_lerp"`` launch for the
        plan and that group's lerp); None: the plan was advanced already. Group ``gi``'s
        stochastic-rounding key is ``sr_key(seed + (gi << 32), step)``. A flag is bound only when
        fastema made it (``_backends.made_here``: a scan's, a plan's), others are viewed at every
        call."""
        stochastic = rounding == "stochastic"
        if plan is None and skip_if is None:            # the usual step: host weights, no guard
            assert weights_by_device is not None
            lerp = LERP[stochastic]
            for gi, g in enumerate(self.layout.groups):
                g.launch_of(lerp)(weights_by_device[g.device], sr_key(seed + (gi << 32), step) if stochastic else 0)
            return
        if given is not None:                           # the device plan's call: its launches kept
            kept = self._plan_kept
            if (kept is None or kept[0] is not plan or kept[1] is not self.layout.groups or kept[2] != stochastic
                    or kept[3] is not plan.carriers):
                kept = self._plan_kept = (plan, self.layout.groups, stochastic, plan.carriers,
                                          self._plan_launches(plan, stochastic))
            for run, args in kept[4]:
                if args is None:
                    run(given)
                else:
                    run(*args)
            return
        for gi, g in enumerate(self.layout.groups):
            flag = None if skip_if is None else skip_if.get(g.device)
            if plan is not None:
                weights, key = plan.weights(g), plan.key(gi, g)
            else:
                assert weights_by_device is not None            # the caller gives weights or a plan
                weights, key = weights_by_device[g.device], sr_key(seed + (gi << 32), step) if stochastic else 0
            if flag is None:
                g.launch_of(LERP[stochastic])(weights, key)
            elif _backends.made_here(flag):
                g.launch_of(self._flagged(flag, g).lerp[stochastic])(weights, key)
            else:                                               # a flag fastema did not make: viewed afresh
                _launch.launch("lerp", g, weights=weights, flag=self._flag_view(skip_if, g), key=key,
                               stochastic=stochastic)

    def _plan_launches(self, plan, stochastic: bool) -> list:
        """``(launch, arguments)`` of each group for a call of ``plan`` (a
        :class:`~fastema.average._device_plan.DevicePlan`) behind its own flags, kept by
        :meth:`update_checked` while the plan, the groups and the rounding are the same (a kept
        launch reads its group's tables at each call: moved sources change nothing here).
        ``arguments`` None: the carrier's, whose one argument is the call's plan step."""
        out: list = []
        for gi, g in enumerate(self.layout.groups):
            if plan.carriers.get(g.device) == gi:
                out.append((g.launch_of(plan.carrier(g.device, gi, stochastic)), None))
                continue
            flag = plan.flags.get(g.device)
            assert flag is None or _backends.made_here(flag), "a plan's own flags"
            run = g.launch_of(LERP[stochastic] if flag is None else self._flagged(flag, g).lerp[stochastic])
            out.append((run, (plan.weights(g), plan.key(gi, g))))
        return out

    def scan_groups(self, flags: dict | None = None) -> dict:
        """Scan every source for inf/NaN on its device, with no host sync (the addresses current).

        Returns ``device -> int32[1]`` flags (1 where one was found), also kept in
        ``self.skipped``. Without ``flags`` they start at zero; pass the flags of an
        earlier scan (another shadow's) to add this shadow's sources to them."""
        flags = dict(flags or {})
        groups = self.layout.groups
        for g in groups:
            if g.device not in flags:
                flags[g.device] = self._zeroed_flag(g)
            flag = flags[g.device]
            whole = g.scan                                # a split group's sources walked whole
            if _backends.made_here(flag):
                whole.launch_of(self._flagged(flag, g).scan)()
            else:                                         # a caller's flag: viewed afresh at every call
                _launch.launch("nonfinite", whole, flag=self._flag_view(flags, g))
        self.skipped = {d: f for d, f in flags.items() if any(g.device == d for g in groups)}
        return flags

    def copy_from_sources_checked(self, skip_if: Mapping | None = None) -> None:
        """Every row <- the sources, once the addresses are current; nothing is copied on a device
        whose ``skip_if`` flag is set."""
        for gi in range(len(self.layout.groups)):
            self.copy_group_in(gi, skip_if)

    def copy_group_in(self, gi: int, skip_if: Mapping | None = None) -> None:
        """Group ``gi``'s rows <- its sources (the addresses current), behind its ``skip_if`` flag:
        kept by the group where fastema made the flag (``_backends.made_here``), else viewed afresh."""
        g = self.layout.groups[gi]
        flag = None if skip_if is None else skip_if.get(g.device)
        if flag is None:
            g.launch_of(_copy_in(self.rows))()
        elif _backends.made_here(flag):
            g.launch_of(self._flagged(flag, g).copy)()
        else:
            _launch.launch("copy", g, to_shadow=True, row_lo=0, row_hi=self.rows, flag=self._flag_view(skip_if, g))

    def _zeroed_flag(self, g):
        flag = self.skipped.get(g.device)
        if flag is None:
            flag = _backends.new_flag(g)                  # in the group's framework, on its device
        _backends.zero_(flag)                             # on the device, stream-ordered: no sync
        return flag

    def _flagged(self, flag, g) -> _Flagged:
        """``flag``, a flag fastema made (nothing re-points its memory), viewed once on ``g``'s device,
        and its launches' specs: made once per flag object, so the groups' launches behind it are kept."""
        views = self._views
        held = views.get(id(flag))                        # (it keeps the flag, so the id is the flag's)
        if held is None:
            if len(views) >= _VIEWS_KEPT:
                views.clear()
            view = self._flag_view({g.device: flag}, g)
            lerp = (_launch.spec("lerp", flag=view), _launch.spec("lerp", flag=view, stochastic=True))
            held = views[id(flag)] = _Flagged(flag, lerp, _launch.spec("nonfinite", flag=view),
                                              _launch.spec("copy", to_shadow=True, row_lo=0, row_hi=self.rows,
                                                           flag=view))
        return held

    @staticmethod
    def _flag_view(flags: Mapping | None, g):
        if flags is None or g.device not in flags:
            return None
        return _backends.control_view(flags[g.device], "skip_if flag", np.int32, 1, g.device, writable=True)
