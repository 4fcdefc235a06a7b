"""Segment and chunk tables: how one launch walks many source tensors.

A group of S source tensors maps onto one flat shadow row of N elements:
segment ``s`` occupies ``[seg_offset[s], seg_offset[s + 1])``. The row is cut into
chunks that never straddle a segment; chunk ``c`` covers
``[chunk_begin[c], chunk_begin[c + 1])`` of segment ``chunk_seg[c]``. A CPU thread or
a CUDA block takes whole chunks, so uneven tensor sizes still balance.
"""
import numpy as np


def segment_offsets(counts):
    """int64[S + 1] prefix sums of the element counts."""
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(np.asarray(counts, np.int64), out=offsets[1:])
    return offsets


def chunk_table(seg_offset, chunk):
    """Cut the row described by ``seg_offset`` into chunks of at most ``chunk`` elements.

    Returns ``(chunk_seg int32[C], chunk_begin int64[C + 1])``. Empty segments get no chunk.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    seg_offset = np.asarray(seg_offset, np.int64)
    counts = np.diff(seg_offset)
    per_seg = (counts + chunk - 1) // chunk
    chunk_seg = np.repeat(np.arange(len(counts), dtype=np.int32), per_seg)
    first = np.repeat(np.cumsum(per_seg) - per_seg, per_seg)       # index of each segment's first chunk
    within = np.arange(len(chunk_seg), dtype=np.int64) - first
    begin = seg_offset[:-1][chunk_seg] + within * chunk
    chunk_begin = np.empty(len(chunk_seg) + 1, np.int64)
    chunk_begin[:-1] = begin
    chunk_begin[-1] = seg_offset[-1]
    return chunk_seg, chunk_begin
