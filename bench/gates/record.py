"""A run's record: its figures with the commit, date, machine and versions (``bench/out/gates-*.json``),
and the committed expectations (``bench/gates.json``)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from .common import EXPECT, OUT, ROOT, SCHEMA


def git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 16)
    except OSError:
        return ""


def _field(cpuinfo: str, key: str) -> str:
    """The first ``key : value`` line's value in /proc/cpuinfo's text, or ""."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return ""


def cpu_flags(cpuinfo: str | None = None) -> set:
    """The CPU's feature flags (/proc/cpuinfo's first ``flags`` line; empty where there is none)."""
    return set(_field(_cpuinfo() if cpuinfo is None else cpuinfo, "flags").split())


_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon",
            "CentaurHauls": "Centaur"}
_NOT_BRANDS = {"intel", "amd", "cpu", "processor", "genuine", "authentic"}


def cpu_family(cpuinfo: str | None = None) -> str:
    """The CPU's family as the ratio gates key their expectations: the vendor (``vendor_id``) and
    the brand, the first word of the ``model name`` after the vendor's (``Intel(R) Xeon(R)
    Processor`` -> ``Intel Xeon``, ``AMD EPYC 7763 64-Core Processor`` -> ``AMD EPYC``,
    ``Intel(R) Core(TM) i7-9750H`` -> ``Intel Core``): stable across a family's models, which VMs
    often hide. Without either field (another architecture's /proc/cpuinfo), the machine's
    architecture (``aarch64``). ``cpuinfo``: the text of /proc/cpuinfo (default: this machine's)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    vendor_id, model = _field(text, "vendor_id"), _field(text, "model name")
    vendor = _VENDORS.get(vendor_id, vendor_id)
    for mark in ("(R)", "(TM)", "(tm)", "(r)"):
        model = model.replace(mark, " ")
    skip = _NOT_BRANDS | {vendor.lower()}
    brand = next((w for w in model.split() if w.isalpha() and w.lower() not in skip), "")
    family = " ".join(part for part in (vendor, brand) if part)
    return family or platform.machine() or "unknown"


def machine() -> dict:
    text = _cpuinfo()
    cpu = _field(text, "model name")
    return {"host": platform.node(), "cpu": cpu or platform.processor(),
            "cpu_family": cpu_family(text), "cores": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}"}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "numba", "numpy", "llvmlite", "numba-cuda", "nvidia-cuda-nvdisasm"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "absent"
    vg = shutil.which("valgrind")
    if vg:
        out["valgrind"] = subprocess.run([vg, "--version"], capture_output=True, text=True).stdout.strip()
    return out


def gpu() -> str | None:
    """The machine's GPU, where torch sees one (the gates' figures are still the CPU's and the fake's)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:                                # noqa: BLE001 - no torch: no GPU
        pass
    return None


def record(figures: dict, failures: list, notes: list, wall_s: float, command: str, on: str = "cpu") -> dict:
    """One run's figures with where and when they were measured (what ``bench/out`` and the history keep).
    ``on``: the device the figures were measured on (``device``; the history draws one series per device:
    a GPU run's file, with its device named, goes in beside the CPU's)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"schema": SCHEMA, "run": f"{now.strftime('%Y%m%dT%H%M%SZ')}-{commit[:10]}", "command": command,
            "commit": commit, "dirty": dirty, "subject": git("log", "-1", "--format=%s")[:100],
            "date": now.isoformat(timespec="seconds"), "machine": {**machine(), "gpu": gpu()}, "device": on,
            "versions": versions(), "figures": figures, "passed": not failures,
            "failures": [f.message() for f in failures], "notes": notes, "wall_s": round(wall_s, 1)}


def write_record(rec: dict, folder: Path = OUT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gates-{rec['run']}.json"
    path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return path


def with_family_ratios(exp: dict, family: str, ratios: dict, stamp: dict) -> dict:
    """``exp`` (bench/gates.json's content) with ``family``'s ratio expectations replaced by
    ``ratios`` and stamped (``measured_on.ratios[family]``); the other families' kept."""
    measured_on = exp.get("measured_on", {})
    stamps = {**measured_on.get("ratios", {}), family: stamp}
    return {**exp, "ratios": {**exp.get("ratios", {}), family: ratios},
            "measured_on": {**measured_on, "ratios": stamps}}


def load_expectations(path: Path = EXPECT) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def clones_median(runs: list[dict], spread: float = 0.015) -> tuple[dict, list[str]]:
    """The expectations of ``runs`` (each a ``bench/gates.json`` that ``update`` wrote in a clean clone of one
    commit, ``scripts/gates_update.sh``): the first run's, each instruction count the median of the runs'
    (the lower middle of an even number), and a line for each scenario whose counts spread past ``spread``
    (relative, smallest to largest). Every run must count the same scenarios."""
    if not runs:
        raise ValueError("no runs to take the median of")
    names = set(runs[0].get("instructions", {}))
    for i, run in enumerate(runs[1:], 2):
        if set(run.get("instructions", {})) != names:
            raise ValueError(f"run {i} counts other scenarios than run 1: "
                             f"{sorted(names ^ set(run.get('instructions', {})))}")
    out, notes = json.loads(json.dumps(runs[0])), []
    for name in sorted(names):
        values = sorted(run["instructions"][name] for run in runs)
        out["instructions"][name] = values[(len(values) - 1) // 2]
        if values[-1] > (1 + spread) * values[0]:
            notes.append(f"{name}: {values[0]:,} to {values[-1]:,} over the {len(runs)} clones")
    return out, notes
