"""The oldest torch ``fastema.torch`` runs on, checked first at its import (:data:`TORCH_FLOOR`)."""
import torch

from ..._floors import refuse_older

#: As ``pyproject.toml``'s ``torch`` extra says: the torch CI tests and ``fastema._privates`` checks.
#: An older release is refused by name, before anything of fastema's touches it
#: (``docs/install.md``, "Which framework release": what torch 2.6-2.12 got wrong).
TORCH_FLOOR = (2, 13)

refuse_older("fastema.torch", "torch", str(torch.__version__), TORCH_FLOOR, "torch",
             "on torch 2.12 a DCP load with broadcast_from_rank0 of an FSDP2-sharded attached average "
             "comes back wrong",
             "fastema's array functions and FlatShadow work without fastema.torch")
