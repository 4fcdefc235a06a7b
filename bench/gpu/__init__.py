"""A GPU run (``bash bench/gpu/run.sh speed|all|targets|rest OUTDIR``, which sources ``env.sh``): its
stages (:mod:`.versions`, :mod:`.contract`, :mod:`.smoke`, :mod:`.cuda_tests` with the pytest plugin
:mod:`.testlog`, :mod:`.headline`, :mod:`.probe`; issue 86's :mod:`.compiled`, :mod:`.mechanisms` and
:mod:`.targets`), what they share (:mod:`.common`, :mod:`.checks`, :mod:`.measure`, :mod:`.timings`,
:mod:`.steps`; the tables' rules: ``bench/suite/figures.py``, ``bench/suite/checked.py``), the summary
line (:mod:`.summary`), the fake GPU's host cost (:mod:`.host_cost`) and the machine-code analysis
(:mod:`.sass`, its table :mod:`.static`). Each stage runs from the repository's root as
``python -m bench.gpu.NAME``."""
