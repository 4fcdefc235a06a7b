"""The oldest torch ``fastema.torch`` runs on (``fastema._floors.FLOORS``), checked first at its import."""
import torch

from ..._floors import refuse_older

refuse_older("fastema.torch", "torch", torch.__version__,
             "older releases are not tested (on torch 2.8 DCP cannot flatten an attached average's "
             "optimizer state)",
             "fastema's array functions and FlatShadow work without fastema.torch")
