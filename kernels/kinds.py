"""Storage kinds and kernel modes: the small integers that select a compiled kernel.

Every value here is part of a kernel's cache key and a compile-time constant inside it,
so the branches that test it fold away. ``kind`` always means a storage kind.
"""

F32, BF16, F16, F64 = 0, 1, 2, 3            # storage kinds
KIND_NAMES = ("float32", "bfloat16", "float16", "float64")
ITEMSIZE = (4, 2, 2, 8)                      # bytes per element of each kind

EXCHANGE, PACK, UNPACK = 0, 1, 2             # swap modes: convert both ways / float32 shadow <-> bfloat16
                                             # source, kept exactly (see _bits.pack_bf16)
DEBIASED, SEEDED, ZEROS = 0, 1, 2            # metric EMA modes: pandas adjust=True / adjust=False / from 0
EMA_PART, SMA_PART = 1, 2                    # what a smoother's streams kernel updates (``parts``: either or both)
STREAM_SCALE = 2.0 ** -64                    # the smoothers' weight of one sample (fastema.smooth.SCALE): the sums
                                             # are kept in units of it, and an unweighted stream's every weight is it

# The device-side plan of a model EMA (``_stats.plan_step``): schedule kinds, and the slots
# of its float64 parameter and state arrays.
CONSTANT, NUM_UPDATES, POWER_WARMUP, POWER_FUNCTION, HALF_LIFE = 0, 1, 2, 3, 4
COSINE, LINEAR, PIECEWISE_CONSTANT = 5, 6, 7     # momentum schedules: each row's table lies in the parameter
                                                # array from the index given as its decay (device_plan.parameters)
WSM, EMA_DECAY_SQRT = 8, 9                      # merge schedules (tables as the momentum schedules'): a weight per
                                                # sample, folded in with the running total kept in the row's norm
WSM_SHAPE_CODES = {"linear": 0, "cosine": 1, "1-sqrt": 2}   # WSM's decay shape, the first number of its table
P_SCHEDULE, P_MIN_DECAY, P_INV_GAMMA, P_POWER, P_AFTER, P_WARMUP, P_EVERY, P_COMPENSATE, P_DEBIAS, \
    P_SEED_LO, P_SEED_HI = range(11)
PLAN_PARAMS = 11
S_CALLS, S_UPDATES, S_LAST, S_NORMS = 0, 1, 2, 3   # state: calls, updates, the last update's time (timed
                                                # schedules), then one normaliser per row
MAX_ROWS = 8                                    # shadow rows (decays) one launch updates (fastema.ops.MAX_DECAYS)
PLAN_KEYS_MAX = 32                              # groups whose rounding keys a fused plan-and-lerp launch
                                                # (plan_lerp_kernel) advances: its per-block copy is this size
NOISE_ROW = 1 << 40                             # stochastic rounding's noise index of row k, element j of a
                                                # group: k * NOISE_ROW + j, j counted in the unpadded row of the
                                                # whole group (seg_offset), so a shadow that holds a slice of
                                                # the group (shard_replicas) draws the whole one's bits


def wide(*kinds) -> bool:
    """True when a kernel over these storage kinds computes in float64 (any of them is float64)."""
    return F64 in kinds
