"""PyTorch model EMA over fastema's flat kernels.

``fastema.torch.EMA(model, decay)`` keeps averaged copies of a model's weights in
flat buffers (one per device and dtype) and updates all of them with one kernel
launch per buffer, with no host sync. Drop-in classes for torch_ema, timm and
``torch.optim.swa_utils`` live in :mod:`fastema.torch.compat`.

The faces are modules here (``ema``, ``window``, ``posthoc``, ``target``), each a subclass of one
base built from its parts (``_face``: ``FaceParts``, made by a builder before the face exists, and
``TorchFace``), with the shared modules of the model averages (``_average``: ``TorchAverage``;
``_swap``: swap and copy-out) and of ``torch.compile`` (``_compile``: the custom operators and the
compiled-step contract, ``face.compiled``). The rest is in sub-packages by the question they
answer, each importing only those listed before it:

- ``_sharding``: other libraries' sharding (DTensors, ZeRO-3 partitions, DeepSpeed's masters);
- ``_tensors``: which tensors are averaged and where they sit (hooks, slots, the model side, a
  target network's pairs, following a changed model);
- ``_placement``: where the average lives (the one picker ``make_shadow``; offload, replicas, host
  masters) and what it holds in memory;
- ``_state``: checkpoints and exports (state dicts, ``save``, a split average's pieces, the ranks'
  agreement before a collective read, PEFT adapters).
"""
from ._face import floor as _floor  # noqa: F401, I001  (first: refuses a torch older than its floor)
from ._face import arrays as _arrays  # noqa: F401  (the array functions' operators, ops.COMPILED)
from ._face.attach import KEY as _ATTACH_KEY
from ._placement.pick import Offload, ShardReplicas
from ._state.checkpoint import FORMAT, VERSION  # noqa: F401
from ._state.dcp_calls import loading as dcp_loading  # noqa: F401
from ._state.decisions import found_together, mesh_findings, refuse_together  # noqa: F401
from ._state.nonfinite import reset as reset_nonfinite  # noqa: F401
from ._state.nonfinite import scan as scan_nonfinite  # noqa: F401
from ._state.slices import SplitEntry
from ._state.stream import WeightMeta
from ._tensors.hooks import HOOKS as _HOOKS  # noqa: F401
from ._tensors.hooks import normalize_name, registration_hooks, unwrap
from .ema import EMA
from .posthoc import PostHocEMA
from .target import TargetNetwork
from .window import WindowAverage

#: The top-level key of an optimizer's state dict that holds an attached average's ``state_dict()``
#: (``ema.attach(optimizer)``; see the attach guide).
ATTACH_KEY = _ATTACH_KEY

__all__ = ["ATTACH_KEY", "EMA", "Offload", "PostHocEMA", "ShardReplicas", "SplitEntry", "TargetNetwork",
           "WeightMeta", "WindowAverage", "normalize_name", "registration_hooks", "unwrap"]

# Kept importable from fastema.torch (not public): FORMAT and VERSION, the EMA checkpoint's schema;
# mesh_findings, refuse_together and found_together, the ranks' decisions (fastema.torchtitan's
# loads and repairs agree through them, as attach()'s and the torch faces' do); scan_nonfinite,
# reset_nonfinite and dcp_loading, a shadow's inf/NaN found and reset and dcp.load's template told
# (fastema.torchtitan's repair_nonfinite and saves); _HOOKS, the installed registration hooks
# (tests).
