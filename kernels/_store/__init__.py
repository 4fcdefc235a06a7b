"""fastema's compiled-code store: one identity (:mod:`.identity`), one entry format (:mod:`.entry`),
one lookup order over the shipped store and the node store (:mod:`.store`), one lock, one trust rule
and one atomic write (:mod:`.files`). Imports nothing of ``fastema``: the CPU kernels' cache uses it
from ``kernels/`` (``kernels._cache``), the launch layer for the device code
(``fastema._launch.cuda.device_code``), the build through ``python -m fastema warm --into``."""
