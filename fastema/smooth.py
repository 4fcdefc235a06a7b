"""Smoothed metrics: moving averages of K streams (a scalar loss is K = 1), on the device.

``Smoother(span=20, window=50).update(loss)`` keeps an EMA and a windowed SMA of every
element of ``loss``. The state lives where the first values live (NumPy, torch CPU or
CUDA); updates are one kernel launch and never read a value back to the host; reading
returns arrays/tensors of the values' shape (a Python or NumPy number's: one stream, shape ``(1,)``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _backends, _launch
from ._checkpoint_format import check_header, load_refused
from ._interrupts import ctrl_c_held
from ._launch.cpu.pool import first_bad_weight
from .kernels import kinds

__all__ = ["Smoother", "alpha_from"]

_MODES = {"debiased": kinds.DEBIASED, "seeded": kinds.SEEDED, "zeros": kinds.ZEROS}
_GROUPS_KEPT = 4      # a smoother's metric groups on a GPU, one per values view (see Smoother._group)

# Every sample weight reaches the kernels times SCALE, so the weighted sums (the debiased EMA's
# a = sum d^i w_i v_i and b = sum d^i w_i, the window's sums of w v and w) are kept in units of
# 2**-64. The means are ratios of two such sums, and scaling by a power of two is exact, so they
# are the same numbers bit for bit; but a sum can no longer overflow float64 unless window *
# sample_weight (SMA) or sample_weight / (1 - decay) (EMA) passes 2**64: two values of 1.7e308
# average to 1.7e308, not inf (and an overflowed window sum stayed inf/NaN for good). Products
# |w v| below 2**64 * 2.2e-308 (~4e-289) lose precision as subnormals.
SCALE = kinds.STREAM_SCALE
VERSION = 3
"""The checkpoint version :meth:`Smoother.state_dict` writes. 3: the state of one fused kernel
(``kernels.cpu.streams_kernel``): pairs interleaved (``ab``: the EMA's (a, b); ``sc``: the window's
compensated sum (s, comp); ``wsc``: its weights' (ws, wcomp)), int32 counts, and until the first
``sample_weight`` no weights at all (``ring_v``, ``sc`` and ``n``: every weight is SCALE, a
non-finite value stays in ``ring_v``); then also ``ring_w``, ``wsc`` and ``bad``. 2: ``a, b, ring_v, ring_w,
s, comp, ws, wcomp`` float64 and ``n, bad`` int64, in units of SCALE; 1: the same unscaled. Both are
converted when loaded (to the weighted layout, which holds everything they held)."""
_V2_SCALED = ("a", "b", "ring_v", "ring_w", "s", "comp", "ws", "wcomp")   # version 1: unscaled
_V2_PAIRS = {"ab": ("a", "b"), "sc": ("s", "comp"), "wsc": ("ws", "wcomp")}
_INT32 = ("n", "bad")


def alpha_from(*, decay=None, alpha=None, span=None, halflife=None, com=None) -> float:
    """The EMA weight ``alpha = 1 - decay`` from exactly one of pandas' parameters.

    ``alpha = 1 - decay = 2 / (span + 1) = 1 / (1 + com) = 1 - exp(-ln 2 / halflife)``.
    """
    given = {k: v for k, v in dict(decay=decay, alpha=alpha, span=span, halflife=halflife, com=com).items()
             if v is not None}
    if len(given) != 1:
        raise TypeError(f"give exactly one of decay, alpha, span, halflife, com; got {sorted(given) or 'none'}")
    (name, v), = given.items()
    v = float(v)
    if name == "decay" and 0.0 <= v < 1.0:
        return 1.0 - v
    if name == "alpha" and 0.0 < v <= 1.0:
        return v
    if name == "span" and v >= 1.0:
        return 2.0 / (v + 1.0)
    if name == "com" and v >= 0.0:
        return 1.0 / (1.0 + v)
    if name == "halflife" and v > 0.0:
        return 1.0 - math.exp(-math.log(2.0) / v)
    ranges = dict(decay="[0, 1)", alpha="(0, 1]", span=">= 1", com=">= 0", halflife="> 0")
    raise ValueError(f"{name} must be {ranges[name]}, got {v!r}")


class Smoother:
    """Exponential and simple moving averages of metric streams, updated without a host sync.

    Args:
        decay, alpha, span, halflife, com: the EMA's weight, one of them (pandas' meanings);
            leave all out for no EMA.
        mode: ``"debiased"`` (default: TensorBoard's smoothing, pandas ``ewm(adjust=True)``),
            ``"seeded"`` (the first value seeds it: ``adjust=False``) or ``"zeros"``
            (from zero, uncorrected).
        window: the SMA's window W (mean of the last W updates, pandas ``rolling(W)``); None for no SMA.
        min_periods: the SMA reads NaN until this many finite values are in the window.
        nonfinite: ``"skip"`` (TensorBoard: inf/NaN leave the stream alone; pandas
            ``ignore_na=True`` for the EMA, a missing value for the SMA) or ``"propagate"``
            (the average becomes NaN: for the SMA while the value is in the window).
    """

    def __init__(self, *, decay=None, alpha=None, span=None, halflife=None, com=None, mode: str = "debiased",
                 window: int | None = None, min_periods: int = 1, nonfinite: str = "skip"):
        has_ema = any(v is not None for v in (decay, alpha, span, halflife, com))
        self.alpha = alpha_from(decay=decay, alpha=alpha, span=span, halflife=halflife, com=com) if has_ema else None
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not isinstance(min_periods, int) or min_periods < 1 or (window is not None and min_periods > window):
            raise ValueError(f"min_periods must be an int in [1, window], got {min_periods!r}")
        if nonfinite not in ("skip", "propagate"):
            raise ValueError(f"nonfinite must be 'skip' or 'propagate', got {nonfinite!r}")
        if not has_ema and window is None:
            raise TypeError("give an EMA parameter (decay, alpha, span, halflife or com), window=, or both")
        self.mode, self.window, self.min_periods, self.nonfinite = mode, window, min_periods, nonfinite
        skip = nonfinite == "skip"
        parts = (kinds.EMA_PART if has_ema else 0) | (kinds.SMA_PART if window is not None else 0)
        self._specs = {w: _launch.spec("streams", parts=parts, skip=skip, weighted=w)
                       for w in (False, True)}
        self._decay = 0.0 if self.alpha is None else 1.0 - self.alpha
        self._forget()

    # ------------------------------------------------------------ state

    def _forget(self) -> None:
        """No values yet: the state is made where the first values live."""
        self.count = 0                           # updates so far (host counter: the ring position)
        self.shape: tuple | None = None
        self._state: dict[str, Any] = {}
        self._where: tuple | None = None
        self._groups: dict = {}
        self._bound = False
        self._weighted = False                   # the weighted layout (from the first sample_weight on)
        self._w0 = SCALE

    def _sizes(self, k: int, weighted: bool) -> dict:
        """``name -> (size, dtype)`` of the state of ``k`` streams in the unweighted or weighted
        layout (:data:`VERSION`)."""
        f64, i32 = np.dtype(np.float64), np.dtype(np.int32)
        sizes: dict[str, tuple[int, np.dtype]] = {}
        if self.alpha is not None:
            sizes["ab"] = (2 * k, f64)
        if self.window is not None:
            sizes.update(ring_v=(self.window * k, f64), sc=(2 * k, f64), n=(k, i32))
            if weighted:
                sizes.update(ring_w=(self.window * k, f64), wsc=(2 * k, f64), bad=(k, i32))
        return sizes

    def _alloc(self, where, shape, weighted: bool = False, st: dict | None = None):
        """The state of ``shape``'s streams in ``where``: zeros, or ``st`` (a load's, made
        there)."""
        k = int(np.prod(shape)) if shape else 1
        if st is None:
            sizes = self._sizes(k, weighted)
            st = {n: _backends.zeros(where, m, dt) for n, (m, dt) in sizes.items()}
        views = {n: _backends.kernel_view(a) for n, a in st.items()}        # fixed: made once
        self._state, self._where, self.shape, self._weighted = st, where, shape, weighted
        self._views = views
        self._groups = {}                        # (kind, values view) -> its metric group (_group)
        self._bound = _launch.is_cuda(where[1])  # bound launches, per values view
        self._pack()

    def _pack(self):
        """The launch's state arguments (``ab, ring_v, sc, n, ring_w, wsc, bad``): this layout's
        views, a stand-in of the same type for each it does not keep (never read)."""
        v = self._views
        if "f64" not in v:                       # 1-element stand-ins, made once
            v["f64"] = _backends.kernel_view(_backends.zeros(self._where, 1, np.float64))
            v["i32"] = _backends.kernel_view(_backends.zeros(self._where, 1, np.int32))
        self._args = tuple(v.get(n, v["i32" if n in _INT32 else "f64"])
                           for n in ("ab", "ring_v", "sc", "n", "ring_w", "wsc", "bad"))

    def _widen(self, weighted: bool = True):
        """The weighted layout's arrays added (zeros): the next launch widens the state into them
        (``kernels.cpu.streams_kernel``'s ``widen``). Once, at the first weighted update; undone
        (``weighted=False``) where that launch fails."""
        k, where = int(np.prod(self.shape)) if self.shape else 1, self._where
        assert where is not None                          # made after _alloc
        narrow = self._sizes(k, False)
        for n, (m, dt) in self._sizes(k, True).items():
            if n in narrow:
                continue
            if weighted:
                self._state[n] = _backends.zeros(where, m, dt)
                self._views[n] = _backends.kernel_view(self._state[n])
            else:
                self._state.pop(n, None)
                self._views.pop(n, None)
        self._weighted = weighted
        self._pack()

    # ------------------------------------------------------------ update / read

    def update(self, values, sample_weight=None) -> None:
        """Add one value per stream (``values`` of the smoother's shape), with an optional
        ``sample_weight`` (a float, or one float64 weight per stream on the values' device), e.g.
        the batch size: finite and >= 0. A weight of 0 leaves the value out: the EMA stays as it
        was (as for a skipped value: no decay, and a NaN of weight 0 is no NaN), and in the window
        the update takes its place with no weight. The debiased EMA and the SMA are weighted; the
        ``"seeded"`` and ``"zeros"`` EMAs take each value of a positive weight as one step. A bad
        weight is refused before anything changes; per-stream weights on a GPU, which only a host
        sync could look at, are checked on the device instead, where a NaN, inf or negative one
        counts as 0."""
        kind, y, where, shape = _backends.metric_values(values, "values")
        if self._where is not None and (where != self._where or shape != self.shape):
            raise ValueError(f"values are {where[0]} {shape} on {where[1]} but this smoother holds {self._where[0]} "
                             f"{self.shape} on {self._where[1]}; pass values of one framework, shape and device "
                             f"(one smoother per stream layout)")
        if sample_weight is None:                                   # the common case, without a call
            w0, c = SCALE, None
        else:
            w0, c = self._weights(sample_weight, y.size, where[1])  # checked before anything changes
        if self._where is None:
            self._alloc(where, shape)
        per_stream = c is not None
        widen = widened = False
        try:                                     # a failure here leaves the layout as it was
            if not self._weighted and (per_stream or w0 != SCALE):
                widened = True
                self._widen()                             # the first weighted update: once
                widen = self.window is not None
            c = self._views["f64"] if c is None else c
            if w0 == self._w0:
                w0 = self._w0                         # the same object: a bound launch packs none
            else:
                self._w0 = w0
            key = (kind, id(y) if self._bound else None)  # on a GPU: per values view (by address)
            group = self._groups.get(key)
            if group is None:
                group = self._group(key)
            window = self.window or 1
            count = self.count
            launch = group.launch_of(self._specs[self._weighted])  # (compiled at a variant's first)
            args = (y, w0, c, per_stream, _MODES[self.mode], self._decay, *self._args, count % window,
                    min(count, window), widen)
            if widened or count < window and self.window is not None:
                # The kernel's writes and the count at once: a window not yet full takes the next
                # value into an empty slot, so a Ctrl-C after the kernel (and before the count)
                # would leave the value in the sums for good and the next one in its slot; a first
                # weighted update has widened the state in place. Later, a call that did not count
                # is taken again into the same slot, evicting itself: no hold (no per-step cost).
                with ctrl_c_held():
                    launch(*args)
                    widened = False
                    self.count = count + 1
                return
            launch(*args)
        except BaseException:
            if widened:
                self._widen(False)
            raise
        self.count = count + 1

    def _group(self, key: tuple) -> _launch.Group:
        """The metric group of values of storage kind ``key[0]``, kept under ``key``: its EMA's and SMA's
        launches (``group.launch``), called as ``ema(values, w0, c, per_stream, a, b, d)`` and
        ``sma(values, w0, c, per_stream, *ring, slot)``. On a GPU one group per values view (a launch's
        variant code and argument block, the state's views in it; the backend keeps a view per address,
        and a training loop's values come at a few addresses, so :data:`_GROUPS_KEPT` a smoother): per
        update only the arguments that are new objects are written into the block (the ring slot; the
        weight and the per-stream weights when they change)."""
        if len(self._groups) >= _GROUPS_KEPT:
            del self._groups[next(iter(self._groups))]    # the oldest
        where = self._where
        assert where is not None                          # made after _alloc
        group = self._groups[key] = _launch.Group(where[1], None, key[0], None, _backends.stream_getter(*where))
        return group

    def _weights(self, sample_weight, k: int, device: str):
        """``(w0, per-stream weight view or None)``: the kernels weigh stream ``k``'s value by ``w0``,
        or by ``c[k] * w0`` with per-stream weights ``c``; ``w0`` carries :data:`SCALE`, so the
        weights are scaled in the kernel (no temporary, no launch of its own). Per-stream weights
        must be finite and >= 0, as scalars: on the host (NumPy, torch CPU) a bad one is refused
        here, before anything changes; on a GPU, where looking would cost a host sync per update,
        the kernel counts a NaN, inf or negative weight as 0 (that stream's value is left out)."""
        if sample_weight is None:
            return SCALE, None
        if isinstance(sample_weight, (int, float)) and not isinstance(sample_weight, bool):
            if not 0 <= sample_weight < math.inf:
                raise ValueError(f"sample_weight must be a finite number >= 0, got {sample_weight!r}")
            return float(sample_weight) * SCALE, None
        c = _backends.control_view(sample_weight, "sample_weight", np.float64, k, device, writable=False)
        i = first_bad_weight(c) if device == "cpu" else -1
        if i >= 0:
            bad = np.count_nonzero(~((c >= 0) & (c < math.inf)))
            raise ValueError(f"sample_weight[{i}] is {float(c[i])!r}: every per-stream sample_weight must be a "
                             f"finite number >= 0 ({bad} of {k} are not); nothing was updated")
        return SCALE, c

    @property
    def ema(self):
        """The EMA of every stream, shaped like the values (NaN where a stream has no value yet)."""
        if self.alpha is None:
            raise AttributeError("this smoother keeps no EMA (give decay, alpha, span, halflife or com)")
        self._started()
        a, b = self._state["ab"][0::2], self._state["ab"][1::2]
        if self.mode == "zeros":
            out = a * 1.0
        else:
            out = _where(b != 0, a / _nonzero(b), math.nan) if self.mode == "debiased" else \
                _where(b != 0, a * 1.0, math.nan)
        return out.reshape(self.shape)

    @property
    def sma(self):
        """The windowed mean of every stream, NaN until ``min_periods`` finite values are in the window."""
        if self.window is None:
            raise AttributeError("this smoother keeps no SMA (give window=)")
        self._started()
        st = self._state
        n = st["n"]
        if self._weighted:
            ok = (n >= self.min_periods) & (st["bad"] == 0)
            weights = st["wsc"][0::2] + st["wsc"][1::2]
        else:                                    # every weight SCALE: their sum n * SCALE, exactly
            weights = _float64(n) * SCALE
            ok = n >= self.min_periods
            if self.nonfinite == "propagate":    # each entry finite or bad: none bad when n counts them all
                ok = ok & (n == min(self.count, self.window))
        mean = (st["sc"][0::2] + st["sc"][1::2]) / _nonzero(weights)
        return _where(ok, mean, math.nan).reshape(self.shape)

    def _started(self):
        if self._where is None:
            raise RuntimeError("no values yet: call update() first")
        if self._where[0] == "cudasim":
            raise RuntimeError("reading a smoother under the CUDA simulator is not supported; "
                               "use state_dict()")

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The smoother's settings, update count and state arrays (version :data:`VERSION`: the weighted
        sums in units of :data:`SCALE`, the weighted layout's arrays once a ``sample_weight`` came):
        copies, which later updates leave as they were."""
        return {"format": "fastema.Smoother", "version": VERSION, "alpha": self.alpha, "mode": self.mode,
                "window": self.window, "min_periods": self.min_periods, "nonfinite": self.nonfinite,
                "count": self.count, "shape": self.shape,
                "state": {k: _backends.concat([v]) for k, v in self._state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (version 3; versions 1 and 2, written by earlier releases, are
        converted: see :data:`VERSION`), from arrays of any framework (made where this smoother's
        state lives, or where the checkpoint's was for one with no values yet); a checkpoint of a
        smoother with no values makes this one start over. Everything is checked and converted
        first: nothing changes on error."""
        check_header(state, "fastema.Smoother", (1, 2, VERSION), "pass what Smoother.state_dict() returned")
        missing = [k for k in ("alpha", "mode", "window", "nonfinite", "count", "shape", "state")
                   if k not in state]
        if missing:
            raise load_refused(f"Smoother checkpoint has no {missing}.")
        mine = (self.alpha, self.mode, self.window, self.nonfinite)
        theirs = (state["alpha"], state["mode"], state["window"], state["nonfinite"])
        if mine != theirs:
            raise ValueError(f"checkpoint smoother has (alpha, mode, window, nonfinite) = "
                             f"{theirs}, this one {mine}")
        count, saved = state["count"], state["state"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise load_refused(f"Smoother checkpoint count must be an int >= 0, got {count!r}.")
        if not isinstance(saved, dict) or (not saved and (count or state["shape"] is not None)):
            raise load_refused("Smoother checkpoint state must be a dict of arrays.")
        if not saved:                            # no values yet (its state_dict before an update)
            self._forget()
            return
        where = self._where or _backends.location(next(iter(saved.values())))
        shape = self.shape if self._where is not None else \
            (tuple(state["shape"]) if state["shape"] is not None else ())
        host = _on_host(saved)
        wrong = [n for n in _INT32 if n in host and not _counts(host[n], min(count, self.window or 0))]
        if wrong:                                # int32 in the kernels: 2**40 would wrap to 0
            raise load_refused(f"Smoother checkpoint arrays {wrong} hold counts outside [0, min(count, window)] "
                               f"= [0, {min(count, self.window or 0)}]: not a state this smoother writes.")
        if state["version"] < VERSION:
            host = _from_version_2(host, state["version"], self.mode)
        k = int(np.prod(shape)) if shape else 1
        weighted = "ring_w" in host or (self.window is None and self._weighted)
        sizes = self._sizes(k, weighted)
        if set(host) != set(sizes) or any(host[n].shape != (m,) for n, (m, _) in sizes.items()):
            raise load_refused("checkpoint smoother state does not match this smoother's streams.")
        wrong = [n for n, (_, dt) in sizes.items()
                 if not np.can_cast(host[n].dtype, dt, "same_kind")]
        if wrong:
            raise load_refused(f"Smoother checkpoint arrays {wrong} are not of their dtypes "
                               f"({', '.join(str(sizes[n][1]) for n in wrong)}).")
        made = {n: _backends.zeros(where, m, dt) for n, (m, dt) in sizes.items()}
        for n, a in made.items():
            _backends.copy_from_host(a, host[n])
        old = self.__dict__.copy()
        with ctrl_c_held():                      # a Ctrl-C here is raised once every stream and the count are in
            try:
                self._alloc(where, shape, weighted, made)
            except BaseException:
                self.__dict__.update(old)
                raise
            self.count = count


def _on_host(saved: dict) -> dict:
    """A checkpoint's arrays (NumPy, torch, CuPy, Numba's, or anything NumPy reads) as NumPy arrays,
    flat, or a load refusal naming the first that is none."""
    host = {}
    for n, a in saved.items():
        try:
            host[n] = np.asarray(_backends.to_host(a) if _backends.backend_of(a) is not None else a)
        except (TypeError, ValueError) as e:
            raise load_refused(f"Smoother checkpoint array {n!r} is not an array of numbers "
                               f"({e}).") from e
    return host


def _from_version_2(host: dict, version: int, mode: str) -> dict:
    """A version 1 or 2 checkpoint's state (:data:`VERSION`, NumPy arrays) in version 3's weighted
    layout: version 1's sums scaled, the pairs interleaved, the counts int32. Refused where a name
    is unknown."""
    unknown = set(host) - set(_V2_SCALED) - set(_INT32)
    if unknown:
        raise load_refused(f"Smoother checkpoint version {version} has unknown arrays {sorted(unknown)}.")
    host = dict(host)
    if version == 1:
        for n in _V2_SCALED:
            if n in host and (n not in ("a", "b") or mode == "debiased"):
                host[n] = host[n] * SCALE        # exact: a power of two
    out = {n: host[n] for n in ("ring_v", "ring_w") if n in host}
    for pair, (x, y) in _V2_PAIRS.items():
        if x in host and y in host and host[x].shape == host[y].shape:
            out[pair] = np.stack([host[x], host[y]], axis=-1).reshape(-1)
        elif x in host or y in host:
            out[pair] = np.zeros(0)              # refused by the sizes' check
    out.update({n: host[n].astype(np.int32) for n in _INT32 if n in host})
    return out


def _counts(a: np.ndarray, most: int) -> bool:
    """Whether every value of ``a`` is a whole number in ``[0, most]`` (the window's counts)."""
    v = a.astype(np.float64)
    return bool(np.all(np.isfinite(v) & (v >= 0) & (v <= most) & (v == np.floor(v))))


def _float64(x):
    """An integer array as float64 (NumPy or torch)."""
    return x.double() if hasattr(x, "double") else x.astype(np.float64)


def _nonzero(x):
    return x + (x == 0)


_where = _backends.where
