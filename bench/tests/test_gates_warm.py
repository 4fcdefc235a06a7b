"""An instruction gate counts a scenario's steady state, whatever scenario was counted before it (issue 78
item 7). CPython (3.11 on) specialises a bytecode site for the types it runs on, and specialises a site
again only after 53 misses and 16 more runs. The scenarios share code (the engine's update driver, the
launches), so after a scenario is counted, those sites are specialised for its types: the next
scenario's regions, which began after 3 updates, ran them missing, and its count followed the scenario
counted before it (stub-gpu TargetNetwork.update at 6 tensors: 87.3k counted alone with EMA.update,
91.8k among every scenario; EMA.update: 68.5k and 62.5k; their ratio, a gate, 1.27x or 1.45x).

Here the gates' own counting (``instructions.count``) runs without valgrind, its client requests
replaced by a record of fastema's bytecode as CPython specialised it when the first region starts and
when the last one ends, for every function one target-network update runs: none may change in between.
The CPU scenarios, no valgrind: about 2 s."""
import dis
import gc
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="no specialising interpreter before 3.11")


def _fastema_code(update) -> dict:
    """``where -> code object`` of every function of fastema that one call of ``update`` runs."""
    code: dict = {}

    def seen(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("fastema"):
            c = frame.f_code
            code[f"{module}.{c.co_qualname} (line {c.co_firstlineno})"] = c

    sys.setprofile(seen)
    try:
        update()
    finally:
        sys.setprofile(None)
    return code


class _Specialised:
    """Client requests that count nothing: the specialised bytecode of ``code`` when the first region
    starts (``start``) and when the last one ends (``end``)."""

    def __init__(self, code: dict):
        self.code, self.start, self.end = code, None, None

    def _now(self) -> dict:
        return {name: [i.opname for i in dis.get_instructions(c, adaptive=True)] for name, c in self.code.items()}

    def gates_zero(self):
        if self.start is None:
            self.start = self._now()

    def gates_toggle(self):
        pass

    def gates_dump(self, name: bytes):
        self.end = self._now()


def test_a_scenario_is_counted_with_the_code_it_shares_specialised_for_its_own_types():
    from bench.gates.common import use_tree
    from bench.gates.instructions import count
    from bench.gates.scenarios import build

    use_tree()
    ema, _ = build("EMA.update", 6, False)
    target, _ = build("TargetNetwork.update", 6, False)
    for update in (ema, target):
        for _ in range(64):                              # as the gates build them
            update()
    code = _fastema_code(target)
    gc.collect()
    gc.disable()                                         # no finalizer runs fastema's code in between
    try:
        count("cpu EMA.update, 6 tensors", ema, 6, _Specialised(code))      # counted first: its types
        seen = _Specialised(code)
        count("cpu TargetNetwork.update, 6 tensors", target, 6, seen)
    finally:
        gc.enable()
    changed = sorted(name for name in code if seen.start[name] != seen.end[name])
    assert not changed, (f"{len(changed)} functions were specialised again inside the counted regions "
                         f"(their count is not the steady state): {changed[:8]}")
