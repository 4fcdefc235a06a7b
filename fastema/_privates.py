"""Every private name of another package that fastema relies on, in one checked table.

A private name (``torch._C._dynamo.guards.TensorGuards``, cuda.core's ``CUDAError``, DCP's
``_init_optim_state``, an attribute such as an optimizer's ``_optimizer_step_post_hooks``) may move
in any release of its package. Each one fastema (or its kernels) reads is a row of :data:`TABLE`:
where it is, which distribution brings it, the versions it was checked against, the files that
rely on it, what fastema does with it and what it does where it is gone. The lookups go through
here (:func:`get`, :func:`find`, :func:`attribute`), and :func:`verify` checks every row against
the installed packages: where one moved, :class:`PrivateNameMoved` names it, the files that use
it, the versions checked and the version installed. ``tests/test_privates.py`` holds the table
complete (an AST scan of ``fastema/`` and ``kernels/`` for private names of other packages) and
true on the installed versions. Python's own modules are not listed: their privates move with
Python, which CI pins.

A row is one of two kinds:

- a **name** of a module (``where = "module:qualname"``): it must exist, and take the parameters
  (or have the fields) ``takes`` names;
- an **attribute** of the objects a class or module makes (``attr``): the owner's code must still
  use it (an attribute, a slot, a name in its methods' code or a string constant), or the owner
  has it.

``kernels/`` imports nothing of ``fastema`` (it is numba and numpy only): its rows are listed and
checked here, and ``kernels/_cache.py`` falls back by itself (its ``SHARED`` flag).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import sys
import types
from typing import Any

__all__ = ["TABLE", "Private", "PrivateNameMoved", "attribute", "checked", "contract", "find", "get",
           "problem", "verify"]


@dataclasses.dataclass(frozen=True)
class Private:
    """One private name of another package (see the module)."""

    where: str                  # "module:qualname"; with ``attr``, the owner whose objects hold it
    dist: str                   # the distribution that brings it (its version is the one that matters)
    checked: str                # the versions it was checked against
    used: tuple[str, ...]       # the repository's files that rely on it
    why: str                    # what fastema does with it, and what it does where it is gone
    takes: tuple[str, ...] = ()     # the parameters a function takes, the fields a dataclass has
    attr: str = ""              # an attribute of the owner's objects (not a name of a module)
    only: str = ""              # a condition of :data:`ONLY` (else the row holds on every build)

    @property
    def name(self) -> str:
        """The dotted name (``module.qualname``, then ``.attr``)."""
        return self.where.replace(":", ".") + (f".{self.attr}" if self.attr else "")


def _p(where: str, dist: str, checked: str, used: str, why: str, takes: tuple = (),
       attr: str = "", only: str = "") -> Private:
    return Private(where, dist, checked, tuple(used.split()), why, takes, attr, only)


def _cuda_torch() -> bool:
    """A CUDA build of torch is loaded (where torch is not, nothing of fastema reaches it)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.version.cuda is not None


#: the builds a row holds on only (``Private.only``): name -> whether this is one
ONLY = {"a CUDA build of torch": _cuda_torch}


_DCP = "torch.distributed.checkpoint.state_dict"
_T = "2.13"                     # the torch CI runs
_ATTACH = "fastema/torch/_state/dcp_calls.py"

TABLE: tuple[Private, ...] = (
    # ---- torch: DCP's calls, told by attach() (dcp_calls; a torch that moved them: DCPContractBroken)
    _p(f"{_DCP}:_init_optim_state", "torch", _T, _ATTACH,
       "DCP's lr-0 dummy step (not an update)", ("optim",)),
    _p(f"{_DCP}:_get_optim_state_dict", "torch", _T, _ATTACH,
       "get_state_dict / get_optimizer_state_dict (the average goes into the per-parameter "
       "entries)", ("optimizers", "info")),
    _p(f"{_DCP}:_load_optim_state_dict", "torch", _T, _ATTACH,
       "set_state_dict / set_optimizer_state_dict (the live keys a flattened load rebuilds from)",
       ("optimizers", "state_dict", "info")),
    _p(f"{_DCP}:_StateDictInfo", "torch", _T, _ATTACH,
       "full_state_dict=True (refused for a split average); broadcast_from_rank0=True (refused for "
       "a sharded stack of two rows or more on a torch before 2.13)",
       ("full_state_dict", "broadcast_from_rank0")),
    # ---- torch: DCP's files, read by fastema's own reader of snapshots (refused where gone)
    _p("torch.distributed.checkpoint.filesystem:_StorageInfo", "torch", _T,
       "fastema/_io/dcp.py fastema/_io/dcp_trust.py",
       "the one class of a DCP snapshot's storage records fastema's unpickler builds",
       ("relative_path", "offset", "length")),
    _p("torch.distributed.checkpoint.metadata:_MEM_FORMAT_ENCODING", "torch", _T,
       "fastema/_io/dcp_trust.py fastema/_io/dcp_unpickler.py",
       "the memory-format enum a snapshot's TensorProperties pickle"),
    # ---- torch: tensors and modules
    _p("torch._C._dynamo.guards:TensorGuards", "torch", _T, "fastema/_backends/torch.py",
       "the layout guard's batched check (a fast path: gone, fastema compares by itself)"),
    _p("torch._dynamo.variables.functions:UserFunctionVariable", "torch", _T,
       "fastema/ops.py fastema/torch/_face/lowered.py",
       "torch.compiler.assume_constant_result's mark, set without importing torch._dynamo on "
       "ops._loaded (Dynamo calls it for real, which registers fastema's operators as it traces; "
       "gone: a compiled function that reaches an array function before they are traces the "
       "eager path, and fails) and on a lowered update's in_graph (gone: its side effect runs "
       "after every compiled call)",
       attr="_dynamo_marked_constant"),
    _p("torch._C:_cuda_getCurrentRawStream", "torch", _T, "fastema/_backends/torch.py",
       "torch's current CUDA stream, one C call per launch", only="a CUDA build of torch"),
    _p("torch._C:_increment_version", "torch", _T, "fastema/_backends/versions.py",
       "autograd's version bump of many tensors at once (gone: one call per tensor)"),
    _p("torch._C._autograd:_get_creation_meta", "torch", _T, "fastema/_backends/versions.py",
       "how a view that requires grad was made: torch's in-place refusal of it, matched by the "
       "array functions (gone: PrivateNameMoved at such a call)"),
    _p("torch:Tensor", "torch", _T, "fastema/_backends/versions.py",
       "whether a tensor that requires grad is a view (torch's in-place refusal, matched)",
       attr="_is_view"),
    _p("torch:Tensor", "torch", _T, "fastema/_backends/versions.py",
       "the leaf a view that requires grad was made from (torch's in-place refusal, matched)",
       attr="_base"),
    _p("torch.utils._python_dispatch:is_traceable_wrapper_subclass", "torch", _T,
       "fastema/_backends/torch.py fastema/torch/_sharding/params.py",
       "tells a tensor subclass that wraps others (refused by name)"),
    _p("torch.utils._pytree", "torch", _T, "fastema/torch/compat/ema_pytorch/_pytree.py",
       "ema-pytorch's drop-in flattens what it averages as ema-pytorch does"),
    _p("torch:Tensor._make_wrapper_subclass", "torch", _T, "fastema/torch/_state/slices.py",
       "SplitEntry: a tensor subclass of a split average's pieces that DCP saves"),
    _p("torch:Tensor", "torch", _T, "fastema/torch/compat/ema_pytorch/_base.py",
       "a buffer's version counter: the drop-in reads its step only when it changed",
       attr="_version"),
    _p("torch:_foreach_copy_", "torch", _T,
       "fastema/torch/_tensors/slots.py fastema/torch/compat/ema_pytorch/_pytree.py "
       "fastema/torch/compat/ema_pytorch/_shared.py fastema/torch/compat/torchrl.py "
       "fastema/torch/_face/lowered.py", "many copies in one call"),
    _p("torch:_foreach_lerp_", "torch", _T, "fastema/torch/compat/swa_utils.py",
       "the drop-in's fallback update, as torch's swa_utils makes it"),
    _p("torch:_foreach_sub", "torch", _T, "fastema/torch/_face/lowered.py",
       "the update lowered into a compiled graph (which Inductor fuses): the difference"),
    _p("torch:_foreach_addcmul_", "torch", _T, "fastema/torch/_face/lowered.py",
       "the update lowered into a compiled graph (which Inductor fuses): one FMA, as Dynamo writes "
       "_foreach_lerp_ from torch 2.12 on"),
    _p("torch._C:_meta_in_tls_dispatch_include", "torch", _T, "fastema/torch/_face/lowered.py",
       "fake tensors' meta flag, read before a dead average's aliases are emptied wherever the "
       "collector runs (gone: not switched)"),
    _p("torch._C:_set_meta_in_tls_dispatch_include", "torch", _T, "fastema/torch/_face/lowered.py",
       "fake tensors' meta flag, off while a dead average's aliases are emptied (gone: not "
       "switched)"),
    _p("torch._C:_DisableTorchDispatch", "torch", _T, "fastema/torch/_face/lowered.py",
       "a dead average's aliases emptied past the Python dispatch modes (gone: under them)"),
    _p("torch._C:DisableTorchFunction", "torch", _T, "fastema/torch/_face/lowered.py",
       "a dead average's aliases emptied past the torch function modes (gone: under them)"),
    _p("torch._C:_set_grad_enabled", "torch", _T, "fastema/_backends/torch_lerp.py",
       "grad mode switched off around torch's lerp_ without torch.no_grad's Python frames"),
    _p("torch.distributed.tensor.placement_types:_StridedShard", "torch", _T,
       "fastema/torch/_sharding/params.py", "FSDP2 + tensor parallel's placement, averaged as Shard"),
    _p("torch.distributed.tensor._utils:compute_local_shape_and_global_offset", "torch", _T,
       "fastema/torch/_state/slices.py", "a local shard's offset in the whole tensor",
       ("global_shape", "mesh", "placements")),
    _p("torch.distributed.tensor:DTensor", "torch", _T, "fastema/torch/_sharding/params.py "
       "fastema/torchtitan/_ema.py fastema/torchtitan/_export.py",
       "the local shard without a dispatch (gone: to_local())", attr="_local_tensor"),
    _p("torch.distributed.fsdp._common_utils", "torch", _T,
       "fastema/_backends/torch.py fastema/torch/_state/attach_checks.py",
       "FSDP1's mark of its flat parameters' pieces (refused by name)", attr="_fsdp_flattened"),
    _p("torch.optim.optimizer:Optimizer", "torch", _T, "fastema/torch/_state/attach_checks.py",
       "an optimizer whose torch hooks ran (attach() registers on it)",
       attr="_optimizer_step_post_hooks"),
    _p("torch._dynamo.eval_frame:OptimizedModule", "torch", _T,
       "fastema/torch/_placement/replicas.py fastema/torch/_tensors/hooks.py",
       "the module torch.compile wraps", attr="_orig_mod"),
    _p("torch.nn:Module", "torch", _T,
       "fastema/torch/_tensors/hooks.py fastema/torch/_tensors/selection.py "
       "fastema/torch/_tensors/slots.py", "a module's own parameters", attr="_parameters"),
    _p("torch.nn:Module", "torch", _T, "fastema/torch/_tensors/hooks.py "
       "fastema/torch/_tensors/slots.py fastema/torchtitan/_held.py "
       "fastema/torch/compat/ema_pytorch/_shared.py", "a module's own submodules", attr="_modules"),
    _p("torch.nn:Module", "torch", _T, "fastema/torch/_tensors/slots.py",
       "a module's buffers left out of its state dict", attr="_non_persistent_buffers_set"),
    _p("torch.serialization:_save", "torch", _T, "fastema/_io/safetensors.py",
       "torch.save's writer, fed host copies one tensor at a time (gone: torch.save)"),
    _p("torch.serialization:_open_zipfile_writer", "torch", _T, "fastema/_io/safetensors.py",
       "torch.save's archive (gone: torch.save)"),
    # ---- cuda.core, transformers, peft, safetensors
    _p("cuda.core._utils.cuda_utils:CUDAError", "cuda-core", "0.3 - 1.2.2",
       "fastema/_launch/cuda/drivers.py", "the error cuda.core raises for a driver's result"),
    _p("transformers.trainer:Trainer.train", "transformers", "5.23", "fastema/transformers.py",
       "EMACallback finds its Trainer and train()'s resume_from_checkpoint on the frames of "
       "transformers' methods (their locals self and resume_from_checkpoint)",
       ("self", "resume_from_checkpoint")),
    _p("peft.peft_model:PeftModel", "peft", "0.21", "fastema/torch/_state/peft.py",
       "the base model class PEFT's adapter_config.json names", attr="_get_base_model_class"),
    _p("safetensors.torch:_TYPES", "safetensors", "0.8", "fastema/_io/safetensors.py",
       "the dtypes the installed safetensors writes (gone: the ones fastema knows)"),
    # ---- numba: kernels/_cache.py's shared disk cache (gone: every process compiles, one warning)
    _p("numba.core.extending:_Intrinsic", "numba", "0.68", "kernels/_cache.py",
       "an intrinsic a kernel calls, described in the kernels' cache key"),
    _p("numba.core.extending:_Intrinsic", "numba", "0.68", "kernels/_cache.py",
       "an intrinsic's definition, described in the kernels' cache key", attr="_defn"),
    _p("numba.core.caching:CompileResultCacheImpl", "numba", "0.68", "kernels/_cache.py",
       "the cache locators, extended by the node-local one", attr="_locator_classes"),
    _p("numba.core.caching:Cache", "numba", "0.68", "kernels/_cache.py",
       "the cache's implementation (its locator and file names)", attr="_impl"),
    _p("numba.core.caching:Cache", "numba", "0.68", "kernels/_cache.py",
       "the function a cache is of", attr="_py_func"),
    _p("numba.core.caching:Cache", "numba", "0.68", "kernels/_cache_node.py",
       "whether the cache is on", attr="_enabled"),
    _p("numba.core.caching:IndexDataCacheFile", "numba", "0.68",
       "kernels/_cache.py kernels/_cache_node.py", "the cache's index file", attr="_index_path"),
    _p("numba.core.caching:IndexDataCacheFile", "numba", "0.68", "kernels/_cache.py",
       "a cached kernel's data file", attr="_data_path"),
    _p("numba.cuda.dispatcher:CUDACache", "numba-cuda", "0.30", "kernels/_cache.py",
       "a launch-config-sensitive kernel's key (numba-cuda; absent before: None)",
       attr="_launch_config_key"),
    _p("numba.cuda.simulator.cudadrv.devicearray:FakeCUDAArray", "numba", "0.68",
       "fastema/_backends/cudasim.py", "the simulator's device memory (a host array)", attr="_ary"),
    # ---- keras, TensorFlow
    _p("keras.src.saving.saving_lib:_VARS_FNAME_H5", "keras", "3.15", "fastema/keras/_saving.py",
       "the weights' file inside a .keras archive"),
    _p("keras.src.backend.jax.trainer:JAXTrainer", "keras", "3.15", "fastema/keras/_jax.py",
       "the trainable weights fit() holds outside the Variables (JAX)", attr="_jax_state"),
    _p("keras.src.backend.jax.trainer:JAXTrainer", "keras", "3.15", "fastema/keras/_jax.py",
       "whether fit()'s JAX state is written back", attr="_jax_state_synced"),
    _p("tensorflow.python.ops.resource_variable_ops:BaseResourceVariable", "tensorflow-cpu",
       "2.21", "fastema/tensorflow/compat.py",
       "a variable's own name, as TensorFlow's slot variables are named", attr="_shared_name"),
)


class PrivateNameMoved(RuntimeError):
    """A private name of another package that fastema relies on is gone or changed in the installed
    version (the message names it, where fastema uses it, the versions checked, and what to do)."""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _resolve(where: str) -> Any:
    """The object at ``module:qualname`` (ImportError, AttributeError where it is not)."""
    module, _, qual = where.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split(".") if qual else ():
        obj = getattr(obj, part)
    return obj


def _fields(obj: Any) -> list[str] | None:
    """A function's parameter names, a dataclass's fields, or None."""
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    try:
        return list(inspect.signature(inspect.unwrap(obj)).parameters)
    except (TypeError, ValueError):
        return None


def _codes(obj: Any, depth: int = 0):
    """The code objects of the functions a class or module defines (methods, properties, nested)."""
    if isinstance(obj, types.ModuleType):
        values = [v for v in vars(obj).values() if getattr(v, "__module__", None) == obj.__name__]
    elif isinstance(obj, type):
        values = [v for k in obj.__mro__ if k is not object for v in vars(k).values()]
    else:
        values = [obj]
    for v in values:
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if isinstance(v, property):
            v = v.fget
        if isinstance(v, type) and depth == 0 and isinstance(obj, types.ModuleType):
            yield from _codes(v, 1)
        code = getattr(inspect.unwrap(v), "__code__", None) if callable(v) else None
        stack = [code] if isinstance(code, types.CodeType) else []
        while stack:
            c = stack.pop()
            yield c
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))


def _uses(owner: Any, attr: str) -> bool:
    """Whether ``owner`` (a class or module) has ``attr``, or its code uses the name."""
    if hasattr(owner, attr) or attr in getattr(owner, "__slots__", ()):
        return True
    if isinstance(owner, types.ModuleType) and attr in [v for v in vars(owner).values()
                                                        if isinstance(v, str)]:
        return True
    return any(attr in c.co_names or attr in c.co_consts for c in _codes(owner))


def problem(entry: Private) -> str | None:
    """Why ``entry`` does not hold on the installed packages, or None (also where its distribution
    is not installed: nothing of fastema reaches it then)."""
    if _version(entry.dist) is None or (entry.only and not ONLY[entry.only]()):
        return None
    try:
        obj = _resolve(entry.where)
    except (ImportError, AttributeError) as err:
        return f"{entry.where.replace(':', '.')} is gone ({type(err).__name__}: {err})"
    if entry.attr and not _uses(obj, entry.attr):
        return f"{entry.where.replace(':', '.')} no longer uses the attribute {entry.attr!r}"
    if entry.takes:
        have = _fields(obj)
        if have is None or not set(entry.takes) <= set(have):
            return (f"{entry.name} no longer takes ({', '.join(entry.takes)}): it takes "
                    f"({', '.join(have or ())})")
    return None


def _moved(entries: list[tuple[Private, str]]) -> PrivateNameMoved:
    lines = [f"{why} (used by {', '.join(e.used)}: {e.why}; checked with {e.dist} {e.checked}, "
             f"installed {_version(e.dist)})" for e, why in entries]
    return PrivateNameMoved(
        "fastema relies on private names of other packages, and the installed versions changed "
        f"{'it' if len(lines) == 1 else 'them'}: " + "; ".join(lines) + ". Install a version "
        "fastema was checked with, or a fastema that supports this one (fastema/_privates.py "
        "lists every such name)")


def verify(entries: tuple[Private, ...] = TABLE) -> None:
    """Check every row on the installed packages; :class:`PrivateNameMoved` names each that moved."""
    bad = [(e, why) for e in entries if (why := problem(e)) is not None]
    if bad:
        raise _moved(bad)


def _rows(where: str, attr: str = "") -> list[Private]:
    rows = [e for e in TABLE if e.where == where and e.attr == attr]
    if not rows:
        raise KeyError(f"{where}{'.' + attr if attr else ''} is not in fastema's table of private "
                       f"names (fastema/_privates.py): add its row")
    return rows


@functools.cache
def _checked_get(where: str) -> Any:
    row = _rows(where)[0]
    why = problem(row)
    if why is not None:
        raise _moved([(row, why)])
    return _resolve(where)


def get(where: str) -> Any:
    """The object at ``where`` (a row of :data:`TABLE`), checked once; :class:`PrivateNameMoved`
    where it moved."""
    return _checked_get(where)


def find(where: str) -> Any | None:
    """The object at ``where`` (a row of :data:`TABLE`), or None where it is gone or changed (a
    lookup with a fallback of its own)."""
    try:
        return _checked_get(where)
    except PrivateNameMoved:
        return None


@functools.cache
def attribute(where: str, attr: str) -> str:
    """``attr``, once the row ``(where, attr)`` is checked: the owner still uses it;
    :class:`PrivateNameMoved` where it no longer does."""
    row = _rows(where, attr)[0]
    why = problem(row)
    if why is not None:
        raise _moved([(row, why)])
    return attr


def contract(module: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """``{name: (what it takes, what fastema tells by it)}`` of the rows of ``module`` (DCP's
    table for :mod:`fastema.torch._state.dcp_calls`)."""
    return {e.where.partition(":")[2]: (e.takes, e.why) for e in TABLE
            if e.where.partition(":")[0] == module and not e.attr}


def checked(module: str) -> str:
    """The versions the rows of ``module`` were checked against."""
    return next(e.checked for e in TABLE if e.where.partition(":")[0] == module)
