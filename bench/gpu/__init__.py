"""A GPU run (``bash bench/gpu/run.sh all|rest OUTDIR``, which sources ``env.sh``): its stages
(:mod:`.versions`, :mod:`.smoke`, :mod:`.cuda_tests` with the pytest plugin :mod:`.testlog`,
:mod:`.headline`, :mod:`.probe`), what they share (:mod:`.common`, :mod:`.checks`,
:mod:`.measure`, :mod:`.timings`, :mod:`.steps`), the summary line (:mod:`.summary`), the fake
GPU's host cost (:mod:`.host_cost`) and the machine-code analysis (:mod:`.sass`, its table
:mod:`.static`). Each stage runs from the repository's root as ``python -m bench.gpu.NAME``."""
