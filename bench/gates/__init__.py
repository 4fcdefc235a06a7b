"""Performance gates that can fail CI (issue 53): deterministic figures against committed expectations,
same-run ratios with a wide factor, and a history of every run.

    python -m bench.gates check   [--only SECTIONS] [--no-rerun]   # CI: exit 1 on a failed gate
    python -m bench.gates update  [--only SECTIONS]                # rewrite bench/gates.json (commit it)
    python -m bench.gates history [FILE ...] [--no-plot]           # bench/out -> bench/history.jsonl, plot

Run from the repository root. SECTIONS is a comma list of :data:`~bench.gates.common.SECTIONS`:

- ``instructions``: host instructions of one steady-state update, counted by valgrind (callgrind's
  ``Ir``: cachegrind's instruction count, with client requests to count only the measured region), for
  ``EMA.update()`` at 6 / 148 / 3000 tensors, ``TargetNetwork.update()``, ``FlatShadow.update()`` and
  ``ema_update_many_``, on the CPU kernels and under the fake GPU (``testkit``: fastema's
  CUDA launch path, kernel factories and shipped code, down to the launch driver's call); the CPU's
  ``ema_update_`` of 16 elements against ``torch.lerp_``; on the stub driver (fastema's real cuda.core
  driver into ``testkit``'s stub ``libcuda.so.1``) each GPU entry point of issue 70 against a bound
  ``FlatShadow.update`` of one tensor, and (issue 78 item 7) a ``swap()`` and ``TargetNetwork.update``
  against ``EMA.update``, and (issue 86 item 3) a kept launch alone (``scenarios.STUB``,
  ``scenarios.BOUNDS``, ``scenarios.CAPS``). One valgrind process runs every
  scenario, with nothing mapped below 2^30 (issue 77, M9: ``instructions.MIN_ADDRESS``): imports and
  warm-up uninstrumented, then per scenario a region of N and one of 2N updates; the figure is their
  difference / N. Gate: within
  ``tolerance.instructions`` (3 %) of the expectation, either way, each bound of
  ``scenarios.BOUNDS`` (a scenario at most a factor times another's, in the same run) and each cap of
  ``scenarios.CAPS`` (a scenario at most so many instructions).
- ``counts``: per update, natively: kernel launches, host syncs, allocations on the device and the host,
  collectives (0 on every per-step path; a one-rank gloo group is up while counting), the bytes the
  update's kernels move, and under the fake GPU the bytes uploaded and the blocks launched. Gate: exact.
- ``sass``: the sm_90 machine code of every per-step CUDA kernel as shipped (``kernels/device``), read by
  ``bench/gpu/sass/`` (registers, spills, stack frame, blocks per SM, the streaming loop's load and
  store widths, bytes in flight). Gate: exact, so a change shows in review.
- ``ratios``: time, fastema over its baseline, both in this process on one thread, interleaved, min
  of N; a call is charged its wall time, less its waits for other processes where it ran on the
  calling thread alone (its thread's CPU time: never a multi-threaded call's). Judged against the
  expectations of this machine's CPU family only (``record.cpu_family``: ``Intel Xeon``, ``AMD
  EPYC``; a family with none is measured and printed, not judged, and the line says how to record
  them). Gate: fails only past ``tolerance.ratio_factor`` (1.5x) times the family's ratio, and only
  when a rerun of that scenario (twice the rounds) confirms it. Each baseline is run once against
  fastema's result from the same start before it is timed, and refused where it does other work
  (``ratios.Pair``, ``bench/suite/checked.py``).

Every ``check`` and ``update`` writes its figures (commit, date, machine, versions) to
``bench/out/gates-STAMP.json``; ``history`` appends those not yet there to ``bench/history.jsonl`` (one
JSON object a line, committed) and plots the headline figures over commits to
``docs/_static/bench_history.png``. A GPU run's file (same format, its ``device`` named) goes in the
same way: ``python -m bench.gates history path/to/gates-....json``.

Needs valgrind (with its headers, ``valgrind/callgrind.h``) and a C compiler for ``instructions``, the
cuda extra (numba-cuda, nvdisasm) for ``counts``' fake GPU and ``sass``. See bench/README.md, "Gates".

The package, one concern a module (``__main__`` imports the others, none imports it; ``common`` imports none):

- ``common``: the paths, the sections, the tolerances' defaults, the record's schema, ``use_tree``;
- ``compare``: expectations against measurements (pure): the failures and their messages, the ratio gate;
- ``record``: a run's record (commit, date, machine, versions) and the committed expectations;
- ``scenarios``: the host scenarios that ``instructions`` and ``counts`` measure;
- ``instructions``: the valgrind process (``python -m bench.gates.instructions`` runs inside it);
- ``counts``, ``sass``, ``ratios``: those sections' measurements;
- ``history``: bench/history.jsonl and its plot;
- ``__main__``: the commands (``check``, ``update``, ``history``).
"""
