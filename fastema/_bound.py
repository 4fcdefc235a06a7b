"""BoundLaunches: the per-step launches of a shadow made of launch groups, each bound once.

:class:`fastema.FlatShadow` (fastema's own flat buffers) and :class:`fastema.pairs.PairShadow`
(the caller's tensors, paired) differ in where the average lives, not in how an update runs:
one launch per group, behind an optional skip flag, with the weights on the host or in a
device plan. This class is that part, written once. A subclass provides ``layout.groups``
(objects with the fields :func:`fastema._launch.launch` reads, plus ``framework``), ``rows``,
``skipped`` and the three caches ``_lerps``, ``_copies`` and ``_scans`` (dicts, empty at first).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _backends, _launch
from ._checks import sr_key


class BoundLaunches:
    """The checked update, the non-finite scan and the copy from the sources, one launch per
    group, each bound once per tables, rounding, flag and carried plan."""

    layout: Any
    rows: int
    skipped: dict
    _lerps: dict
    _copies: dict
    _scans: dict

    def update_checked(self, weights_by_device: dict | None, rounding: str, seed: int, step: int, skip_if,
                       plan=None, given: int | None = None) -> None:
        """The launches of an update whose arguments are checked and whose addresses are current
        (the model averages check the addresses themselves, in one pass with the model's own
        tensors). ``weights_by_device``: :func:`fastema._checks.resolve_weights` per device; or
        ``plan``, a :class:`fastema.average._device_plan.DevicePlan` whose device arrays hold the
        weights and the rounding keys (``seed`` and ``step`` unused). ``given`` (with ``plan``):
        this call's plan step (the training step, -1 for the update count) rides in the first
        launch of each device the plan lists in ``carriers`` (one launch for the plan and that
        group's lerp); None: the plan was advanced already. Group ``gi``'s stochastic-rounding key
        is ``sr_key(seed + (gi << 32), step)``. Each group's launch is bound once per tables,
        rounding, flag and carried plan (:func:`fastema._launch.lerp_launcher`); a flag is bound
        only when fastema made it (``_backends.made_here``: a scan's, a plan's), others are viewed
        at every call."""
        stochastic = rounding == "stochastic"
        lerps = self._lerps
        if plan is None and skip_if is None:            # the usual step: host weights, no guard
            assert weights_by_device is not None
            for gi, g in enumerate(self.layout.groups):
                bound = lerps.get(gi)
                if bound is None or bound[0] is not g.tables or bound[1] is not stochastic or bound[2] is not None \
                        or bound[3] is not None:
                    bound = self._bind_lerp(gi, g, stochastic, None, None)
                bound[4](weights_by_device[g.device], sr_key(seed + (gi << 32), step) if stochastic else 0)
            return
        assert given is None or (plan is not None and skip_if is plan.flags), "a carried plan step: its own flags"
        for gi, g in enumerate(self.layout.groups):
            flag = None if skip_if is None else skip_if.get(g.device)
            carrier = None
            if plan is not None:
                if given is not None and plan.carriers.get(g.device) == gi:
                    carrier = plan
                weights, key = plan.weights(g), plan.key(gi, g)
            else:
                assert weights_by_device is not None            # the caller gives weights or a plan
                weights, key = weights_by_device[g.device], sr_key(seed + (gi << 32), step) if stochastic else 0
            if carrier is None and flag is not None and not _backends.made_here(flag):   # a flag fastema did not make:
                _launch.launch("lerp", g, weights=weights, flag=self._flag_view(skip_if, g), key=key,
                               stochastic=stochastic)                           # viewed afresh at every call
                continue
            bound = lerps.get(gi)
            if bound is None or bound[0] is not g.tables or bound[1] is not stochastic or bound[2] is not flag \
                    or bound[3] is not carrier:
                bound = self._bind_lerp(gi, g, stochastic, flag, carrier)
            if carrier is not None:
                bound[4](given)
            else:
                bound[4](weights, key)

    def _bind_lerp(self, gi: int, g, stochastic: bool, flag, carrier) -> tuple:
        """Group ``gi``'s prepared launch: the lerp behind ``flag`` (:func:`fastema._launch.lerp_launcher`),
        or with ``carrier``, a device plan, that plan's step and the lerp in one launch
        (:func:`fastema._launch.plan_lerp_launcher`). Made again when the group's tables were
        replaced (new source addresses), the rounding, the flag object or the carried plan changed."""
        if carrier is not None:
            run = _launch.plan_lerp_launcher(g, carrier.views(g.device), gi, stochastic=stochastic)
        else:
            view = None if flag is None else self._flag_view({g.device: flag}, g)
            run = _launch.lerp_launcher(g, flag=view, stochastic=stochastic)
        bound = self._lerps[gi] = (g.tables, stochastic, flag, carrier, run)
        return bound

    def scan_groups(self, flags: dict | None = None) -> dict:
        """Scan every source for inf/NaN on its device, with no host sync (the addresses current).

        Returns ``device -> int32[1]`` flags (1 where one was found), also kept in
        ``self.skipped``. Without ``flags`` they start at zero; pass the flags of an
        earlier scan (another shadow's) to add this shadow's sources to them."""
        flags = dict(flags or {})
        groups = self.layout.groups
        scans = self._scans
        for gi, g in enumerate(groups):
            if g.device not in flags:
                flags[g.device] = self._zeroed_flag(g)
            flag = flags[g.device]
            whole = getattr(g, "scan", g)                 # a split group's sources walked whole
            if not _backends.made_here(flag):             # a caller's flag: viewed afresh at every call
                _launch.launch("nonfinite", whole, flag=self._flag_view(flags, g))
                continue
            bound = scans.get(gi)
            if bound is None or bound[0] is not whole.tables or bound[1] is not flag:
                bound = scans[gi] = (whole.tables, flag, _launch.nonfinite_launcher(whole, self._flag_view(flags, g)))
            bound[2]()
        self.skipped = {d: f for d, f in flags.items() if any(g.device == d for g in groups)}
        return flags

    def copy_from_sources_checked(self, skip_if: Mapping | None = None) -> None:
        """Every row <- the sources, once the addresses are current; nothing is copied on a device
        whose ``skip_if`` flag is set."""
        for gi, g in enumerate(self.layout.groups):
            self.copy_group_in(gi, skip_if)

    def copy_group_in(self, gi: int, skip_if: Mapping | None = None) -> None:
        """Group ``gi``'s rows <- its sources (the addresses current), behind its ``skip_if`` flag:
        bound once per group tables and flag where fastema made the flag (``_backends.made_here``),
        else viewed afresh."""
        g = self.layout.groups[gi]
        flag = None if skip_if is None else skip_if.get(g.device)
        if flag is not None and not _backends.made_here(flag):
            _launch.launch("copy", g, to_shadow=True, row_lo=0, row_hi=self.rows, flag=self._flag_view(skip_if, g))
            return
        bound = self._copies.get(gi)
        if bound is None or bound[0] is not g.tables or bound[1] is not flag:
            view = None if flag is None else self._flag_view(skip_if, g)
            bound = self._copies[gi] = (g.tables, flag, _launch.copy_launcher(
                g, to_shadow=True, row_lo=0, row_hi=self.rows, flag=view))
        bound[2]()

    def _zeroed_flag(self, g):
        flag = self.skipped.get(g.device)
        if flag is None:
            flag = _backends.new_flag(g)                  # in the group's framework, on its device
        _backends.zero_(flag)                             # on the device, stream-ordered: no sync
        return flag

    @staticmethod
    def _flag_view(flags: Mapping | None, g):
        if flags is None or g.device not in flags:
            return None
        return _backends.control_view(flags[g.device], "skip_if flag", np.int32, 1, g.device, writable=True)
