"""The performance gates' logic (the package bench/gates/, issue 53): tolerances, failure messages, the rerun
that confirms a ratio, reading callgrind's dumps, the run records and the history. No valgrind, no timing."""
import importlib
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("common", "compare", "record", "scenarios", "instructions", "counts", "ratios", "history", "__main__")


@pytest.fixture(scope="module")
def gates():
    """This tree's bench.gates (bench/ is a folder of the tree, imported from its root), a module an attribute:
    ``gates.compare``, ``gates.record``, ..., ``gates.cli`` (the command line, ``bench/gates/__main__.py``)."""
    root = str(ROOT)
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        modules = {name: importlib.import_module(f"bench.gates.{name}") for name in MODULES}
    finally:
        if added:
            sys.path.remove(root)
    assert Path(modules["common"].__file__).resolve().is_relative_to(ROOT / "bench" / "gates")
    return types.SimpleNamespace(cli=modules.pop("__main__"), **modules)


# ---------------------------------------------------------------- instructions: tolerance and message


def test_instructions_within_the_tolerance_pass_either_way(gates):
    exp = {"cpu EMA.update, 6 tensors": 100_000}
    assert gates.compare.compare_instructions(exp, {"cpu EMA.update, 6 tensors": 102_999}, 0.03) == []
    assert gates.compare.compare_instructions(exp, {"cpu EMA.update, 6 tensors": 97_001}, 0.03) == []


def test_instructions_past_the_tolerance_fail_with_a_message_naming_everything(gates):
    name = "fake-gpu EMA.update, 3000 tensors"
    [f] = gates.compare.compare_instructions({name: 4_000_000}, {name: 4_200_000}, 0.03)
    msg = f.message()
    for part in (name, "instructions per update", "4,000,000", "4,200,000", "+5.0%", "tolerance 3%",
                 "python -m bench.gates update --only instructions", "bench/gates.json"):
        assert part in msg, (part, msg)


def test_fewer_instructions_fail_too_so_the_gain_is_kept(gates):
    [f] = gates.compare.compare_instructions({"a": 1000}, {"a": 900}, 0.03)
    assert "-10.0%" in f.message() and "fewer is good" in f.message()


def test_a_scenario_without_expectation_or_measurement_fails(gates):
    failures = gates.compare.compare_instructions({"old": 10}, {"new": 10}, 0.03)
    assert {f.scenario for f in failures} == {"old", "new"}
    assert any("no expectation" in f.message() for f in failures)
    assert any("did not run" in f.message() for f in failures)


# ---------------------------------------------------------------- counts and machine code: exact


def test_counts_are_exact(gates):
    exp = {"cpu EMA.update, 6 tensors": {"launches": 1, "host_syncs": 0, "collectives": 0}}
    assert gates.compare.compare_exact("counts", exp, json.loads(json.dumps(exp))) == []
    moved = {"cpu EMA.update, 6 tensors": {"launches": 2, "host_syncs": 0, "collectives": 0}}
    [f] = gates.compare.compare_exact("counts", exp, moved)
    msg = f.message()
    for part in ("[counts]", "cpu EMA.update, 6 tensors", "launches", "measured 2", "expected 1", "exact",
                 "python -m bench.gates update --only counts"):
        assert part in msg, (part, msg)


def test_a_new_figure_and_a_changed_string_fail(gates):
    exp = {"lerp f32<-f32": {"registers": 54, "streaming_loop": "4x16 B ld, 2x16 B st"}}
    got = {"lerp f32<-f32": {"registers": 54, "streaming_loop": "4x4 B ld, 4x4 B st", "spill_bytes": 0}}
    failures = gates.compare.compare_exact("sass", exp, got)
    assert {f.figure for f in failures} == {"streaming_loop", "spill_bytes"}
    assert all("update --only sass" in f.message() for f in failures)


# ---------------------------------------------------------------- ratios: wide factor, rerun confirmation


def _measure(values):
    it = iter(values)
    calls = []

    def measure(name, again=False):
        calls.append(name + (" again" if again else ""))
        return next(it), {"fastema_ms": 1.0, "baseline_ms": 1.0}
    return measure, calls


def test_a_ratio_under_the_factor_is_measured_once(gates):
    measure, calls = _measure([1.4])
    results, failures = gates.compare.ratio_gate({"flat": 1.0}, measure, 1.5)
    assert failures == [] and calls == ["flat"] and results[0].rerun is None


def test_a_ratio_past_the_factor_that_a_rerun_does_not_confirm_passes(gates):
    measure, calls = _measure([1.6, 1.2])
    results, failures = gates.compare.ratio_gate({"flat": 1.0}, measure, 1.5)
    assert failures == [] and calls == ["flat", "flat again"]
    assert results[0].rerun == 1.2 and not results[0].failed
    assert "noise" in results[0].note(1.5)


def test_a_ratio_past_the_factor_confirmed_by_the_rerun_fails(gates):
    measure, calls = _measure([2.0, 1.9])
    results, [f] = gates.compare.ratio_gate({"GPT-2": 0.8}, measure, 1.5)
    assert calls == ["GPT-2", "GPT-2 again"] and results[0].failed
    msg = f.message()
    for part in ("[ratios]", "GPT-2", "measured 2", "expected 0.8", "1.5x", "1.2", "confirmed by a rerun (1.9)",
                 "fastema 1.0 ms, baseline 1.0 ms", "python -m bench.gates update --only ratios"):
        assert part in msg, (part, msg)


def test_without_a_rerun_the_first_measurement_decides(gates):
    measure, calls = _measure([2.0])
    _, [f] = gates.compare.ratio_gate({"flat": 1.0}, measure, 1.5, rerun=False)
    assert calls == ["flat"] and "no rerun" in f.message()


def test_a_ratio_with_no_committed_value_fails(gates):
    measure, _ = _measure([1.0])
    _, [f] = gates.compare.ratio_gate({}, measure, 1.5, names=["new scenario"])
    assert "no committed ratio" in f.message()


# ---------------------------------------------------------------- valgrind's output


def test_per_update_instructions_from_the_callgrind_dumps(gates):
    text = "\n".join([
        "version: 1", "desc: Trigger: Client Request: cpu EMA.update, 6 tensors@20", "summary: 1000500",
        "totals: 1000500", "desc: Trigger: Client Request: cpu EMA.update, 6 tensors@40", "totals: 2000500",
        "desc: Trigger: Client Request: fake-gpu FlatShadow.update, 148 tensors@8", "totals: 800",
        "desc: Trigger: Client Request: fake-gpu FlatShadow.update, 148 tensors@16", "totals: 1600",
        "desc: Trigger: Program termination", "totals: 0"])
    dumps = gates.instructions.parse_callgrind(text)
    assert dumps["cpu EMA.update, 6 tensors@40"] == 2000500
    assert gates.instructions.per_update(dumps) == {"cpu EMA.update, 6 tensors": 50000,
                                                    "fake-gpu FlatShadow.update, 148 tensors": 100}


def test_the_committed_expectations_cover_every_scenario(gates):
    exp = gates.record.load_expectations()
    assert set(exp["instructions"]) == set(gates.scenarios.host_names())
    assert set(exp["counts"]) == set(gates.scenarios.host_names())
    assert set(exp["ratios"]) == set(gates.ratios.RATIOS)
    assert all(v["collectives"] == 0 for v in exp["counts"].values())     # no per-step path makes one
    assert exp["tolerance"]["ratio_factor"] >= 1.5 and exp["tolerance"]["instructions"] <= 0.03


# ---------------------------------------------------------------- records and history


def _record(gates, run, commit, instructions, ratio, sass=None):
    figures = {"instructions": {"cpu EMA.update, 6 tensors": instructions},
               "ratios": {"flat float32 2^20 (in cache): ema_update_ / torch.lerp_": {"ratio": ratio}}}
    if sass is not None:
        figures["sass"] = sass
    return {"schema": gates.common.SCHEMA, "run": run, "commit": commit, "dirty": False, "date": run, "device": "cpu",
            "machine": {"cpu": "test"}, "versions": {}, "figures": figures, "passed": True, "wall_s": 1.0}


def test_a_run_record_names_commit_date_machine_versions(gates, tmp_path):
    rec = gates.record.record({"counts": {}}, [], ["a note"], 1.23, "check counts")
    for key in ("commit", "date", "machine", "versions", "device", "run", "figures", "passed"):
        assert key in rec
    assert rec["versions"]["python"] and rec["passed"] and rec["notes"] == ["a note"]
    path = gates.record.write_record(rec, tmp_path)
    assert json.loads(path.read_text())["run"] == rec["run"]


def test_history_appends_each_run_once(gates, tmp_path):
    files = []
    for i, (commit, instr, ratio) in enumerate([("a" * 40, 1000, 1.1), ("b" * 40, 1010, 1.2)]):
        f = tmp_path / f"gates-{i}.json"
        f.write_text(json.dumps(_record(gates, f"2026-11-2{i}", commit, instr, ratio,
                                        sass={"lerp f32<-f32": {"registers": 54}})))
        files.append(f)
    history = tmp_path / "history.jsonl"
    assert gates.history.append_history(files, history) == ["2026-11-20", "2026-11-21"]
    assert gates.history.append_history(files, history) == []            # nothing twice
    runs = gates.history.read_history(history)
    assert [r["commit"][0] for r in runs] == ["a", "b"]
    assert "sass" not in runs[0]["figures"] and runs[0]["figures"]["sass_registers"] == {"lerp f32<-f32": 54}
    assert len(history.read_text().splitlines()) == 2


def test_history_plot_is_written(gates, tmp_path):
    pytest.importorskip("matplotlib")
    runs = [gates.history.history_line(_record(gates, f"r{i}", c * 40, 1000 + i, 1.0 + i / 10))
            for i, c in enumerate("ab")]
    out = gates.history.plot_history(runs, tmp_path / "h.png")
    assert out.stat().st_size > 1000


def test_unknown_sections_are_refused(gates):
    with pytest.raises(SystemExit):
        gates.cli.main(["check", "--only", "instructions,wall"])


# ---------------------------------------------------------------- the counters


def test_the_counters_see_allocations_syncs_leaks_and_collectives(gates):
    torch = pytest.importorskip("torch")
    figures = gates.counts.count_one(lambda: torch.zeros(4).add(1).sum().item(), None)
    assert (figures["device_allocs"], figures["host_syncs"], figures["launches"]) == (3, 1, 0)
    # sys.getallocatedblocks() is the process's: under pytest-xdist another thread (execnet's) allocates and
    # frees beside the update, a few blocks a window, so a leak is measured big enough to stand out of that
    # (the gates themselves run in a process of their own, where the count is exact)
    assert abs(figures["heap_blocks"]) <= 1
    kept: list = []
    assert 60 <= gates.counts.count_one(lambda: kept.extend(object() for _ in range(64)), None)["heap_blocks"] <= 68
    import torch.distributed as dist

    counters = gates.counts._Counters(None)
    with counters.active():
        with pytest.raises(Exception):                  # no process group here: counted, then refused
            dist.all_reduce(torch.zeros(1))
    assert counters.c["collectives"] == 1
