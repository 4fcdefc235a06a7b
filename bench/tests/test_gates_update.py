"""``scripts/gates_update.sh``'s merge of its clean clones' expectations (``bench.gates.record.clones_median``):
each instruction count the median of the clones', the rest the first clone's. No valgrind."""
import pytest

from bench.gates import record


def test_the_clones_median_keeps_each_scenarios_middle_count_and_names_a_wide_spread():
    a, b = "cpu EMA.update, 6 tensors", "cpu torch.lerp_, 1 tensors"
    runs = [{"instructions": {a: 100, b: 13_701}, "counts": {"x": 1}},
            {"instructions": {a: 104, b: 13_443}, "counts": {"x": 2}},
            {"instructions": {a: 101, b: 13_435}, "counts": {"x": 3}}]
    out, notes = record.clones_median(runs)
    assert out["instructions"] == {a: 101, b: 13_443}
    assert out["counts"] == {"x": 1} and runs[0]["instructions"][a] == 100       # the first run's, not changed
    assert notes == [f"{a}: 100 to 104 over the 3 clones", f"{b}: 13,435 to 13,701 over the 3 clones"]
    assert record.clones_median(runs[:2])[0]["instructions"] == {a: 100, b: 13_443}   # the lower middle
    with pytest.raises(ValueError, match="run 2 counts other scenarios than run 1"):
        record.clones_median([runs[0], {"instructions": {a: 1}}])
    with pytest.raises(ValueError, match="no runs"):
        record.clones_median([])
