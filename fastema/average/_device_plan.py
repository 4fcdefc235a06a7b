"""DevicePlan: a model EMA's plan kept in device memory, so CUDA graphs replay it.

A :class:`fastema.average.Plan` is Python numbers: the update count, the calls, the
debiasing normalisers, and from them each update's weights and stochastic-rounding key.
Inside a captured CUDA graph none of that Python runs again: a replay would reuse the
capture's weights (a warm-up schedule stuck at the capture step) and its rounding key (the
same noise every step: biased rounding). A DevicePlan keeps the plan's state, parameters
and products in small device arrays, one set per device, and advances them with a
one-thread kernel (``kernels._stats.plan_step``) at the start of every ``update()`` call;
the update's kernels then read the weights, the skip flag (``update_every``) and the key
from device memory. Where it is exact, the step rides in the first lerp launch of each
device instead (:attr:`DevicePlan.carriers`, the ``"plan_lerp"`` launch): one launch
where there were two. So ``EMA.update()`` captured once and replayed N times equals N eager
calls bit for bit, and eager calls use the very same kernel.

The host Plan still advances on eager calls (no device read); after graph replays it lags
the device, and :meth:`DevicePlan.read_into` (one sync, done by ``state_dict()``) brings it
up to date. A compiled step may also advance the plan itself, in the graph (``torch.compile``'s
plain case: :func:`formula` says which plans can, :attr:`DevicePlan.in_graph` that one does): from
then on every read of the host plan's counters reads the device's first.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from .. import _backends, _launch
from ..kernels.kinds import (
    CONSTANT,
    COSINE,
    EMA_DECAY_SQRT,
    HALF_LIFE,
    LINEAR,
    NUM_UPDATES,
    P_AFTER,
    P_COMPENSATE,
    P_DEBIAS,
    P_EVERY,
    P_INV_GAMMA,
    P_MIN_DECAY,
    P_POWER,
    P_SCHEDULE,
    P_SEED_HI,
    P_SEED_LO,
    P_WARMUP,
    PIECEWISE_CONSTANT,
    PLAN_KEYS_MAX,
    PLAN_PARAMS,
    POWER_FUNCTION,
    POWER_WARMUP,
    S_CALLS,
    S_LAST,
    S_NORMS,
    S_UPDATES,
    WSM_SHAPE_CODES,
    wide,
)
from ..kernels.kinds import WSM as WSM_KIND
from ..schedules import (
    BEMA,
    MAX_BOUNDARIES,
    Constant,
    Cosine,
    EmaDecaySqrt,
    HalfLife,
    Linear,
    NumUpdates,
    PiecewiseConstant,
    PowerFunction,
    PowerWarmup,
)
from ..schedules import WSM as WSMSchedule
from ._plan import Plan

__all__ = ["DevicePlan", "check_state", "formula", "parameters"]

_SCHEDULE_KINDS = {Constant: CONSTANT, NumUpdates: NUM_UPDATES, PowerWarmup: POWER_WARMUP,
                   PowerFunction: POWER_FUNCTION, HalfLife: HALF_LIFE, Cosine: COSINE, Linear: LINEAR,
                   PiecewiseConstant: PIECEWISE_CONSTANT, WSMSchedule: WSM_KIND, EmaDecaySqrt: EMA_DECAY_SQRT}
_TABLED = (Cosine, Linear, PiecewiseConstant, WSMSchedule, EmaDecaySqrt)   # a table per row in the parameters


def _table(s) -> list:
    """A momentum or merge schedule's numbers, as ``_stats.momentum_decay`` / ``merge_weight`` read them."""
    if isinstance(s, PiecewiseConstant):
        return [len(s.boundaries), *map(float, s.boundaries), *map(float, s.values)]
    if isinstance(s, WSMSchedule):
        return [float(WSM_SHAPE_CODES[s.shape]), float(s.start), float(s.end), float(s.every)]
    if isinstance(s, EmaDecaySqrt):
        return [float(s.beta), float(s.switch_step), float(s.decay_steps)]
    return [float(s.start), float(s.end), float(s.total_steps)]


def _row_parameter(s) -> float:
    """The per-row number ``plan_step`` reads as ``decays[i]``."""
    if isinstance(s, PowerFunction):
        return float(s.gamma)
    if isinstance(s, HalfLife):
        return float(s.half_life)
    return float(s.decay)


def parameters(plan: Plan, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(params float64[PLAN_PARAMS + tables], decays float64[K])`` of ``plan`` for ``plan_step``.

    A momentum schedule (:class:`fastema.schedules.Cosine` and the others) or a merge schedule
    (:class:`~fastema.schedules.WSM`, :class:`~fastema.schedules.EmaDecaySqrt`) puts its numbers after
    the shared parameters, and its row's ``decays[i]`` is where they start."""
    first = plan.schedules[0]
    if isinstance(first, BEMA):
        raise ValueError("decay=BEMA(...) keeps its bias correction on the host: it cannot run with device_step=True "
                         "(CUDA-graph replays); make the EMA with device_step=False")
    if any(type(s) is not type(first) for s in plan.schedules):
        raise ValueError("a device-side plan needs one schedule kind for every decay")
    params = np.zeros(PLAN_PARAMS, np.float64)
    params[P_SCHEDULE] = _SCHEDULE_KINDS[type(first)]
    params[P_EVERY] = plan.update_every
    params[P_COMPENSATE] = plan.compensate
    params[P_DEBIAS] = plan.debias
    params[P_SEED_LO], params[P_SEED_HI] = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    if isinstance(first, PowerWarmup):
        shared = {(s.min_decay, s.inv_gamma, s.power, s.update_after_step, s.warmup) for s in plan.schedules}
        if len(shared) != 1:
            raise ValueError("a device-side plan needs the same warm-up parameters for every decay")
        params[P_MIN_DECAY], params[P_INV_GAMMA], params[P_POWER] = first.min_decay, first.inv_gamma, first.power
        params[P_AFTER], params[P_WARMUP] = first.update_after_step, first.warmup
    if type(first) in _TABLED:
        starts, tables = [], [params]
        for s in plan.schedules:
            starts.append(float(sum(t.size for t in tables)))
            tables.append(np.array(_table(s), np.float64))
        return np.concatenate(tables), np.array(starts, np.float64)
    return params, np.array([_row_parameter(s) for s in plan.schedules], np.float64)


def check_state(plan: Plan, state: dict, seed: int, problems: list) -> None:
    """Append to ``problems`` why a device plan cannot run ``state`` (a :meth:`Plan.state` that
    :meth:`Plan.check_state` passed for ``plan``): :func:`parameters` of that candidate, checked
    with the load's other checks, so that a refused load changes neither the host plan nor the
    device's (:meth:`DevicePlan.load` would refuse it only after the host plan had loaded it)."""
    candidate = copy.deepcopy(plan)
    candidate.load_state(state)
    try:
        parameters(candidate, seed)
    except ValueError as err:
        problems.append(str(err))


IN_GRAPH = {CONSTANT: "constant", NUM_UPDATES: "num_updates", POWER_WARMUP: "power_warmup",
            POWER_FUNCTION: "power_function", HALF_LIFE: "half_life"}
"""The schedule kinds whose decay a compiled graph computes itself (``plan_step``'s formulas of
the update count and the time, in float64): the others (momentum tables, merge schedules) need
the kernel."""
STATE = {"calls": S_CALLS, "updates": S_UPDATES, "last": S_LAST, "norms": S_NORMS}
"""Where ``plan_step`` keeps each counter in ``state`` (the normalisers from ``"norms"`` on)."""
PARAMS = {"min_decay": P_MIN_DECAY, "inv_gamma": P_INV_GAMMA, "power": P_POWER, "after": P_AFTER,
          "warmup": P_WARMUP}
"""Where ``parameters`` puts a warm-up's numbers in the ``params`` array."""


def formula(plan: Plan) -> tuple | None:
    """How a compiled graph advances ``plan`` as the plan kernel does, where it can (every call due:
    ``update_every=1``; one schedule kind of :data:`IN_GRAPH`), else None: ``(kind, rows, debias)``,
    ``kind`` the :data:`IN_GRAPH` name, ``rows`` each row's schedule as Python numbers: a constant's
    decay, else a tuple (its decay, gamma or half-life, the plan kernel's ``decays[i]``, then a
    warm-up's shared parameters).
    Made once a load (:attr:`DevicePlan.recipe`): the traced update reads this one tuple, whose
    values are the compiled code's guards (each schedule's attributes read while tracing were as
    many more)."""
    first = type(plan.schedules[0])
    name = next((n for cls, n in _IN_GRAPH_TYPES if cls is first), None)
    if plan.cadence.every != 1 or name is None or any(type(s) is not first for s in plan.schedules):
        return None
    return name, tuple(_graph_row(name, s) for s in plan.schedules), bool(plan.debias)


def _graph_row(kind: str, s) -> tuple | float:
    if kind == "power_function":
        return (float(s.gamma),)
    if kind == "half_life":
        return (float(s.half_life),)
    if kind == "power_warmup":
        return (float(s.decay), float(s.min_decay), float(s.inv_gamma), float(s.power),
                float(s.update_after_step), bool(s.warmup))
    if kind == "constant":
        return float(s.decay)                     # (a number, not a tuple of one: fewer guards)
    return (float(s.decay),)


_IN_GRAPH_TYPES = tuple((cls, IN_GRAPH[kind]) for cls, kind in _SCHEDULE_KINDS.items() if kind in IN_GRAPH)


def _capacity(rows: int) -> int:
    """The parameter array's size: the shared parameters and the largest tables of ``rows`` momentum
    schedules, so a checkpoint's schedules load into the array a captured graph reads."""
    return PLAN_PARAMS + rows * (2 * MAX_BOUNDARIES + 2)


class _OnDevice:
    """The plan's arrays on one device (framework objects, and the kernels' views of them)."""

    def __init__(self, framework: str, device: str, rows: int, groups: int, params: int):
        where = (framework, device)
        self.group = _launch.Group(device, None, 0, None, _backends.stream_getter(framework, device))
        sizes = dict(state=(S_NORMS + rows, np.float64), params=(params, np.float64),
                     decays=(rows, np.float64), w32=(rows, np.float32), w64=(rows, np.float64),
                     flag=(1, np.int32), keys=(groups, np.int64), done=(1, np.int32))
        self.arrays = {k: _backends.zeros(where, n, dt) for k, (n, dt) in sizes.items()}
        _backends.mark_made_here(self.arrays["flag"])
        self.views = {k: _backends.kernel_view(a) for k, a in self.arrays.items()}
        self.key_views = [self.views["keys"][i:i + 1] for i in range(groups)]
        self.step = self.group.launch("plan", **{k: self.views[k] for k in _launch.OPS["plan"].fixed})   # run(given)


class DevicePlan:
    """The device side of ``plan`` for the groups of one shadow (see the module docstring)."""

    STATE = STATE                   # where the plan kernel keeps each counter (a graph's reads)
    formula = staticmethod(formula)

    def __init__(self, plan: Plan, groups: Sequence, seed: int, also: Sequence[tuple[str, str]] = ()):
        """``also``: ``(framework, device)`` of launches that sit behind this plan's flags on devices
        no group of ``groups`` is on (a target network's copied buffers): those devices get the plan
        too, its kernel run there on its own, so each has a flag set at every call."""
        self.devices: dict[str, _OnDevice] = {}
        parameters(plan, seed)                    # refuses what the device cannot run, before any allocation
        for framework, device in [(g.framework, g.device) for g in groups] + list(also):
            if device not in self.devices:
                self.devices[device] = _OnDevice(framework, device, plan.rows, len(groups), _capacity(plan.rows))
        self._carriers: dict = {}                 # (device, gi, stochastic) -> its plan_lerp spec (carrier())
        self.carriers: dict[str, int] = {}
        """``device -> gi``: the group whose lerp launch carries the device's plan step (the first group
        there with elements, which the update launches first); a device not listed runs the plan
        kernel on its own (no group with elements, or more groups than ``PLAN_KEYS_MAX``)."""
        if len(groups) <= PLAN_KEYS_MAX:
            for gi, g in enumerate(groups):
                if g.tables.chunks and g.device not in self.carriers:
                    self.carriers[g.device] = gi
        self.uncarried = [device for device in self.devices if device not in self.carriers]
        """The devices whose plan kernel runs on its own (:meth:`advance` with ``carried``)."""
        self.flags = {device: d.arrays["flag"] for device, d in self.devices.items()}
        """``device -> int32[1]`` skip flags (framework arrays), set by :meth:`advance` on a call
        that ``update_every`` skips; a non-finite scan may add to them. The same dict every call
        (not to be changed)."""
        self.flag_views = {device: d.views["flag"] for device, d in self.devices.items()}
        """``device -> the kernels' view of its flag`` (the same dict every call, as :attr:`flags`)."""
        self.recipe: tuple | None = None
        """:func:`formula` of the plan as last loaded (:meth:`load`: at construction and at every
        checkpoint load, the only times a plan's schedules change)."""
        self.in_graph = False
        """True once a compiled graph advances the plan on the device itself (see
        :func:`formula`; set while tracing): the host plan's counters are then read from the
        device (:meth:`read_into`) before every use."""
        self.stepped = False
        """True once a schedule over training time may have its last update's time past the calls
        (an ``update(step=)`` made, or loaded): a plain call then has its time checked (a compiled
        one goes through the operator, an eager one reads the device's counters first)."""
        self.load(plan, seed)

    def load(self, plan: Plan, seed: int) -> None:
        """Write the host plan's parameters and state to every device (at construction and on
        a checkpoint load: a host copy, not a per-step path)."""
        params, decays = parameters(plan, seed)
        self.recipe = formula(plan)
        self.stepped = plan.timed and plan.last_time > plan.calls
        params = np.concatenate([params, np.zeros(_capacity(plan.rows) - params.size)])  # one size for every load
        self._params = params
        state = np.array([plan.calls, plan.updates, plan.last_time, *plan.norms], np.float64)
        for d in self.devices.values():
            for name, values in (("params", params), ("decays", decays), ("state", state)):
                _backends.copy_from_host(d.arrays[name], values)

    def read_into(self, plan: Plan) -> None:
        """Set the host plan's counters and normalisers from the device (one sync): after CUDA
        graph replays, or compiled steps that advanced the plan in the graph (:attr:`in_graph`:
        every call of theirs was due and counted by its call: with no first update's time yet, the
        first is the call after the host's last; an eager call then reads first and keeps its own
        time, ``Average.update``), the device is ahead of the host."""
        state = _backends.to_host(next(iter(self.devices.values())).arrays["state"])
        if self.in_graph and plan.first_time is None and state[S_UPDATES] > plan.updates:
            plan.first_time = float(plan.cadence.calls + 1)      # a graph's first: the next call
        plan.cadence.calls, plan.updates = int(state[S_CALLS]), int(state[S_UPDATES])
        plan.last_time = float(state[S_LAST])
        plan.norms = [float(x) for x in state[S_NORMS:]]

    def skip_next(self) -> None:
        """Make the next call one that ``update_every`` skips: a scratch plan that warms the update's
        kernels without writing anything (a host copy, at construction only)."""
        params = self._params.copy()
        params[P_EVERY] = 2.0
        for d in self.devices.values():
            state = np.zeros(d.views["state"].size, np.float64)
            state[S_CALLS] = 1.0                              # 1 % 2 != 0: skipped
            _backends.copy_from_host(d.arrays["params"], params)
            _backends.copy_from_host(d.arrays["state"], state)

    def apart(self) -> None:
        """No lerp launch carries the plan step from now on: the plan kernel runs on its own on
        every device (the layout before issue 23 item 2, kept for the benchmark that compares the
        two). ``carriers`` is a new dict: the kept launches (``StepLaunches``) are made again."""
        self.carriers = {}
        self.uncarried = list(self.devices)

    def advance(self, step: int | None, carried: bool = False) -> None:
        """One ``update()`` call: the plan kernel on every device (no host sync); with ``carried``,
        only on the devices no lerp launch carries the step for (:attr:`carriers`)."""
        given = -1 if step is None else step
        devices = self.devices
        for device in self.uncarried if carried else devices:
            devices[device].step(given)

    def tensors(self) -> list:
        """The plan's arrays on every device, as the framework made them (a compiled operator's
        written tensors; their bytes)."""
        return [a for d in self.devices.values() for a in d.arrays.values()]

    def views(self, device: str) -> dict:
        """The kernel views of ``device``'s plan arrays (what the ``"plan_lerp"`` launch binds)."""
        return self.devices[device].views

    def carrier(self, device: str, gi: int, stochastic: bool) -> _launch.Spec:
        """The spec of group ``gi``'s ``"plan_lerp"`` launch on ``device`` (the plan's step and the group's
        lerp in one launch: ``group.launch_of(spec)``), made once per group and rounding."""
        key = (device, gi, stochastic)
        spec = self._carriers.get(key)
        if spec is None:
            spec = self._carriers[key] = _launch.spec("plan_lerp", **self.devices[device].views, gi=gi,
                                                      stochastic=stochastic)
        return spec

    def weights(self, g) -> object:
        """The weights array the kernels of group ``g`` read (float64 for a float64 kernel)."""
        v = self.devices[g.device].views
        return v["w64"] if wide(g.shadow_kind, g.src_kind) else v["w32"]

    def key(self, gi: int, g) -> object:
        """The int64[1] stochastic-rounding key of group number ``gi``."""
        return self.devices[g.device].key_views[gi]
