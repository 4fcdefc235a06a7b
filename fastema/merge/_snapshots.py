"""fastema's post-hoc snapshots as merge inputs (one per stored profile): built on the post-hoc
readers once they are split out of ``posthoc/snapshots.py``."""
from __future__ import annotations


def snapshot_file(src, read: str) -> list:
    """The profiles of a post-hoc snapshot file (``src`` its safetensors source), or [] for a plain file."""
    return []


def snapshot_folder(path: str, label: str, read: str) -> list:
    """The profiles of every snapshot in a post-hoc snapshot folder, or [] when it holds none."""
    return []
