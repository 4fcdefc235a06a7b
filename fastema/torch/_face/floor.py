"""The oldest torch ``fastema.torch`` runs on, checked first at its import (:data:`TORCH_FLOOR`)."""
import re

import torch

#: As ``pyproject.toml``'s ``torch`` extra says: the torch CI tests and ``fastema._privates`` checks.
#: An older release is refused by name, before anything of fastema's touches it
#: (``docs/install.md``, "Which torch": what torch 2.10-2.12 got wrong).
TORCH_FLOOR = (2, 13)


def refuse_older(version: str) -> None:
    """Raise :class:`ImportError` where ``version`` (torch's) is older than :data:`TORCH_FLOOR`,
    saying what to do (a pre-release of the floor, ``2.13.0a0+git...``, counts as the floor)."""
    found = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if found < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(
            f"fastema.torch needs torch >= {floor}, found torch {version}: older releases are not "
            f"tested (on torch 2.12 a DCP load with broadcast_from_rank0 of an FSDP2-sharded "
            f"attached average comes back wrong). Upgrade torch (pip install -U 'torch>={floor}', "
            f"or install 'fastema[torch]'); fastema's array functions and FlatShadow work without "
            f"fastema.torch")


refuse_older(str(torch.__version__))
