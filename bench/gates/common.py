"""What every part of the gates shares: where things are, the sections, the tolerances' defaults, the
record's schema, the decay of every scenario, and importing fastema from this tree (:func:`use_tree`)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
EXPECT = BENCH / "gates.json"
HISTORY = BENCH / "history.jsonl"
PLOT = ROOT / "docs" / "_static" / "bench_history.png"
OUT = BENCH / "out"
SECTIONS = ("instructions", "counts", "sass", "ratios")
DETERMINISTIC = ("instructions", "counts", "sass")
INSTR_TOLERANCE = 0.03            # defaults; the committed file's "tolerance" wins
RATIO_FACTOR = 1.5
SCHEMA = 1
DECAY = 0.999


class ToolMissing(RuntimeError):
    pass


def use_tree() -> None:
    """Import fastema (and ``fastema.kernels``, which the package maps from ``kernels/``) from this tree,
    whatever is installed (the helpers are imported as ``bench.gpu.sass``,
    ``testkit.fake_gpu``: ``python -m bench.gates`` runs from the root)."""
    import importlib.abc
    import importlib.util

    class _Tree(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            folder = {"fastema": ROOT / "fastema", "fastema.kernels": ROOT / "kernels"}.get(name)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    if not any(type(f).__name__ == "_Tree" for f in sys.meta_path):
        sys.meta_path.insert(0, _Tree())
