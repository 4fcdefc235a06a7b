"""Each batch's own share of a Keras running mean, kept on the device where Keras adds it.

Keras's ``Mean`` keeps the running sum of an epoch in float32 and adds each batch's share
(``loss * batch_size`` for the loss) to it; once the sum is large, a small batch's share falls
below one float32 step of it, and the difference of two sums no longer gives it back (a loss
of 1e-2 after two batches of 1e6: 0). :func:`install` makes a running mean also keep the
share and sample count of its last ``size`` updates, exactly as Keras computed them, in a ring
of metric variables: a sub-metric of the mean, so they go wherever its variables go (captured
by the traced step on TensorFlow, carried in fit's state on JAX) and are read with its total
and count in the same transfer. Keras does not save metric variables.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

__all__ = ["SHARES", "install", "last_shares"]

SHARES = "_fastema_batch_shares"          # the attribute of the running mean holding its ring


def _recordable(mean) -> bool:
    """Whether ``mean`` updates only its total and count, the way Keras's ``Mean`` does (the loss
    trackers, and metric functions wrapped by ``MeanMetricWrapper``: mae, accuracy, ...)."""
    update = getattr(type(mean), "update_state", None)
    return isinstance(mean, keras.metrics.Mean) and update in (
        keras.metrics.Mean.update_state, keras.metrics.MeanMetricWrapper.update_state)


class BatchShares(keras.metrics.Metric):
    """The share (sum) and sample count of a running mean's last ``size`` updates, and where the
    next goes (``pos``)."""

    def __init__(self, mean, size: int):
        super().__init__(name=f"{mean.name}_batch_shares")
        self.size = size
        self.sums = self.add_variable(shape=(size,), initializer="zeros", dtype=mean.total.dtype,
                                      name="sums")
        self.counts = self.add_variable(shape=(size,), initializer="zeros", dtype=mean.count.dtype,
                                        name="counts")
        self.pos = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="pos")

    def record(self, share, count) -> None:
        here = ops.equal(ops.arange(self.size, dtype="float32"), self.pos.value)
        self.sums.assign(ops.where(here, share, self.sums.value))
        self.counts.assign(ops.where(here, count, self.counts.value))
        nxt = self.pos.value + 1.0
        self.pos.assign(ops.where(nxt >= self.size, ops.zeros_like(nxt), nxt))

    def reset_state(self):                 # not Keras's to reset: the ring spans its resets
        pass

    def update_state(self, *args, **kwargs):
        raise TypeError("BatchShares is filled by its running mean's update_state")

    def result(self):
        return {}


class _Recording:
    """The running mean's ``update_state``: Keras's own update, run on a zero total and count
    (a stateless scope) to get the batch's share and count as Keras computes them, then added
    to the total and count (``total + share``, exactly Keras's sum) and recorded in the ring.
    An object, not a closure: a deep copy of the model copies it with its mean."""

    def __init__(self, mean, shares: BatchShares):
        self.mean, self.shares = mean, shares

    def __call__(self, *args, **kwargs):
        mean = self.mean
        zeros = [(mean.total, ops.zeros((), mean.total.dtype)),
                 (mean.count, ops.zeros((), mean.count.dtype))]
        with keras.StatelessScope(state_mapping=zeros) as scope:
            type(mean).update_state(mean, *args, **kwargs)
        share, count = scope.get_current_value(mean.total), scope.get_current_value(mean.count)
        mean.total.assign_add(share)
        mean.count.assign_add(count)
        self.shares.record(share, count)


def install(mean, size: int) -> bool:
    """Make ``mean`` keep its last ``size`` updates (once per mean); True when it was done now (a
    step traced before does not have it yet). A mean that updates more than its total and count
    is left as it is."""
    if getattr(mean, SHARES, None) is not None or not _recordable(mean):
        return False
    shares = BatchShares(mean, size)
    setattr(mean, SHARES, shares)          # tracked: its variables join the mean's
    mean.update_state = _Recording(mean, shares)
    return True


def last_shares(ring: np.ndarray, size: int, steps: int, d_count: float,
                tol: float) -> float | None:
    """The mean of the newest updates in ``ring`` (``[pos, sums..., counts...]``) whose counts add
    up to ``d_count`` (the running count's growth since the last report, within ``tol``), taking
    at most ``steps``; None when none does (the step did not record: traced before the ring)."""
    pos = int(ring[0])
    newest = (pos - 1 - np.arange(min(steps, size))) % size
    sums, counts = np.cumsum(ring[1:1 + size][newest]), np.cumsum(ring[1 + size:][newest])
    hit = np.flatnonzero(np.abs(counts - d_count) <= tol)
    return float(sums[hit[0]] / counts[hit[0]]) if hit.size and counts[hit[0]] > 0 else None
