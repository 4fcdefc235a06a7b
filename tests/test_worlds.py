"""The distributed tests' long-lived gloo worlds (tests/worlds.py, through tests/dist.py's run_ranks):
a world serves test after test with each test's process-global changes put back, and a test that breaks
it (a rank raised, a collective out of step, the group destroyed, the time limit passed) leaves the next
test a fresh world; ``fresh=True`` gives a test a world of its own; what a test leaves alive is frozen
(gc.freeze) in the test process and in the ranks, out of the next tests' collections."""
import os

import pytest
import torch
import torch.distributed as dist
import worlds
from dist import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _pid(rank, world):
    return {"pid": torch.tensor(os.getpid())}


def _pids(tmp_path, name):
    return [int(r["pid"]) for r in run_ranks(_pid, tmp_path / name, 2)]


def _change_everything(rank, world, folder):
    import numba

    os.environ["FASTEMA_WORLD_TEST"] = "1"
    os.environ.pop("PATH", None)
    os.chdir(folder)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    dist.all_reduce(torch.ones(1))
    return {"pid": torch.tensor(os.getpid())}


def _what_it_sees(rank, world, folder):
    import numba

    return {"pid": torch.tensor(os.getpid()), "env": torch.tensor("FASTEMA_WORLD_TEST" not in os.environ and
                                                                  "PATH" in os.environ),
            "dtype": torch.tensor(torch.get_default_dtype() == torch.float32),
            "threads": torch.tensor([torch.get_num_threads(), numba.get_num_threads()]),
            "cwd": torch.tensor(os.getcwd() != folder)}


def test_a_world_serves_the_next_test_with_the_process_state_put_back(tmp_path):
    first = _pids(tmp_path, "a")
    changed = [int(r["pid"]) for r in run_ranks(_change_everything, tmp_path / "b", 2, str(tmp_path))]
    seen = run_ranks(_what_it_sees, tmp_path / "c", 2, str(tmp_path))
    assert first == changed == [int(r["pid"]) for r in seen]            # the same processes: no new spawn
    for r in seen:
        assert bool(r["env"]) and bool(r["dtype"]) and bool(r["cwd"]) and r["threads"].tolist() == [1, 1]
    assert worlds.world(2).alive()


def _raises_on_one(rank, world):
    if rank == 1:
        raise ValueError("rank 1 says no")
    dist.barrier()                                   # rank 0 waits for a rank that will never come
    return {}


def _out_of_step(rank, world):
    if rank == 0:                                    # a collective the other rank never enters, caught
        try:
            dist.all_reduce(torch.ones(1))
        except Exception:
            pass
    return {}


def _destroys(rank, world):
    dist.destroy_process_group()
    return {}


def _sleeps(rank, world):
    import time

    time.sleep(60)
    return {}


def _ended(size: int, run) -> bool:
    """``run()`` on the world of ``size`` ranks this process has: is that world ended after it (the next
    test then gets a fresh one)?"""
    w = worlds.world(size)
    run()
    return not w.alive()


def test_a_test_that_breaks_its_world_leaves_the_next_one_a_fresh_world(tmp_path):
    def raised():
        with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="rank 1 says no"):
            run_ranks(_raises_on_one, tmp_path / "raised", 2, timeout=60)

    def late():
        with pytest.raises(TimeoutError, match="did not finish in 2"):
            run_ranks(_sleeps, tmp_path / "late", 1, timeout=2)

    assert _ended(2, raised)
    assert _ended(2, lambda: run_ranks(_out_of_step, tmp_path / "step", 2, pg_timeout=2, timeout=60))  # passes
    assert _ended(1, lambda: run_ranks(_destroys, tmp_path / "destroyed", 1, timeout=60))            # passes
    assert _ended(1, late)


def test_fresh_gives_a_test_a_world_of_its_own(tmp_path):
    shared = [int(r["pid"]) for r in run_ranks(_pid, tmp_path / "shared", 1)]
    own = [int(r["pid"]) for r in run_ranks(_pid, tmp_path / "own", 1, fresh=True)]
    assert set(own).isdisjoint(shared)
    assert [int(r["pid"]) for r in run_ranks(_pid, tmp_path / "again", 1)] == shared   # the shared one goes on


def _frozen(rank, world):
    import gc

    return {"frozen": torch.tensor(gc.get_freeze_count())}


def test_what_a_test_leaves_alive_is_frozen_and_what_it_makes_is_collected(tmp_path):
    """The test process (tests/support/frozen.py: as each file starts) and a world's ranks (after a test
    that imported modules, its state put back) freeze what is alive after a collection, so that a
    test's gc.collect() walks its own objects, not every framework's; a cycle a test makes is
    collected as before."""
    import gc

    from support.frozen import new_cycle_collected

    assert gc.get_freeze_count() > 10_000                        # torch's objects at least
    assert new_cycle_collected()
    run_ranks(_frozen, tmp_path / "first", 2)                    # the job's imports, then frozen
    assert all(int(r["frozen"]) > 10_000 for r in run_ranks(_frozen, tmp_path / "second", 2))
