"""tests/support/frozen.py: what the files before a test file left alive is frozen out of the cyclic
collector's walk when the file starts, in a folder with no conftest of its own too;
what a test makes is collected as before."""
import os
from pathlib import Path

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
FIRST = """
import shared


class Made:
    pass


def test_make():
    shared.KEPT.append(Made())
"""
SECOND = """
import gc

import shared
from support.frozen import new_cycle_collected


def test_the_first_files_object_is_frozen_and_a_new_cycle_is_collected():
    kept = shared.KEPT[0]
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())       # frozen: no longer walked
    assert new_cycle_collected()
"""


def test_what_the_files_before_left_alive_is_frozen_in_every_folder(pytester, monkeypatch):
    pytester.makepyfile(shared="KEPT = []\n")
    for folder, text in (("a", FIRST), ("b", SECOND)):          # no conftest anywhere
        (pytester.path / folder).mkdir()
        (pytester.path / folder / f"test_{folder}.py").write_text(text)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(pytester.path)]))
    done = pytester.runpytest_subprocess("-p", "support.frozen", "-p", "no:cacheprovider", "a", "b")
    done.assert_outcomes(passed=2)
