"""ema-pytorch 0.8.3's ``EMAModuleWrapper``: an ``EMA`` whose copy's submodule outputs are routed
into the online model's forward (self-distillation)."""
from __future__ import annotations

import inspect
import typing

import torch
from torch import nn

from .._common import AllOrNothingLoad
from ._base import AssertionRuntimeError, AssertionTypeError, AssertionValueError
from ._model import EMA


class _KwargSpec(typing.NamedTuple):
    """One routing of ``EMAModuleWrapper``: the EMA copy's submodule ``ema_path``'s output (through
    ``transform``) goes to the online submodule ``receiver_path`` as keyword ``kwarg_name``."""
    receiver_path: str
    ema_path: str
    kwarg_name: str
    transform: typing.Callable | None = None


def _submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    if not path or path == ".":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"ema_module_kwargs: {what} {path!r} is not a submodule of the model ({err}); use a "
                         f"name from model.named_modules()") from None


def _parse_specs(model: nn.Module, ema_module_kwargs, default_kwarg: str) -> list:
    """ema-pytorch's ``parse_ema_module_kwargs``: a list / tuple / set of paths (each receives its
    own EMA copy's output as ``default_kwarg``) or a dict ``receiver -> value``, the value a
    submodule path (its EMA copy's output), a keyword name (the receiver's own EMA copy's
    output under that name), a tuple ``(ema_path, kwarg_name, transform)`` (None: the default)
    or a dict with ``ema_module_path`` / ``ema_path``, ``ema_kwarg`` / ``kwarg_name``, ``transform``."""
    if ema_module_kwargs is None:
        return []
    if isinstance(ema_module_kwargs, (list, tuple, set)):
        return [_KwargSpec(path, path, default_kwarg) for path in ema_module_kwargs]
    if not isinstance(ema_module_kwargs, dict):
        raise AssertionTypeError(f"ema_module_kwargs must be a dict, a list, a tuple or a set of module paths, "
                                 f"got {type(ema_module_kwargs).__name__}")
    specs = []
    for receiver, value in ema_module_kwargs.items():
        if isinstance(value, str):
            try:
                model.get_submodule(value)
                is_path = True
            except AttributeError:
                is_path = False
            specs.append(_KwargSpec(receiver, value, default_kwarg) if is_path else
                         _KwargSpec(receiver, receiver, value))
        elif isinstance(value, (tuple, list)):
            ema_path, kwarg_name, transform, *_ = (*tuple(value), None, None, None)
            specs.append(_KwargSpec(receiver, receiver if ema_path is None else ema_path,
                                    default_kwarg if kwarg_name is None else kwarg_name, transform))
        elif isinstance(value, dict):
            given: typing.Any = value                  # any mapping of the keys below
            specs.append(_KwargSpec(receiver, given.get("ema_module_path", given.get("ema_path", receiver)),
                                    given.get("ema_kwarg", given.get("kwarg_name", default_kwarg)),
                                    given.get("transform")))
        else:
            raise TypeError(f"ema_module_kwargs[{receiver!r}] is a {type(value).__name__}; give a module path or a "
                            f"keyword name (str), a tuple (ema_path, kwarg_name, transform) or a dict")
    return specs


class EMAModuleWrapper(AllOrNothingLoad):
    """ema-pytorch 0.8.3's ``EMAModuleWrapper``: an :class:`EMA` of ``model`` (made from
    ``**ema_kwargs``, or ``ema=``) that routes the EMA copy's submodule outputs into the online
    model's forward (self-distillation: BYOL, DINO, JEPA-style targets).

    ``ema_module_kwargs`` names the routes (see ema-pytorch's README): ``{'branch_a.block1':
    'branch_b.block1'}`` runs the EMA copy first (``no_grad``, eval mode) and passes its
    ``branch_b.block1`` output to the online ``branch_a.block1`` as ``ema_output=`` (or the
    keyword ``default_ema_kwarg``, or one named per route). ``wrapper(x)`` does that while the
    online model trains (``forward_online_during_train=True``), and otherwise returns
    ``ema_model(x)``; ``only_online=True`` / ``only_ema=True`` run one model alone, and
    ``ema_args`` / ``ema_kwargs`` give the EMA copy other inputs (a second view). ``update()``,
    ``update_model_with_ema()``, ``eval()`` (the EMA copy's) and ``forward_eval()`` are the
    EMA's; ``state_dict()`` keys are ema-pytorch's (``ema.step``, ``ema.ema_model.*``, ...).

    Deviations from ema-pytorch, on purpose: every route is checked (paths exist, the receiver's
    forward takes the keyword) before any hook is put on the model, and a bad one is a
    ``ValueError`` / ``TypeError`` naming it (ema-pytorch asserts midway, leaving the earlier
    hooks on the model, and drops a route of an unknown form silently); ``ema=`` together with
    EMA keyword arguments is refused (ema-pytorch ignores the arguments), as is an ``ema=`` of
    another model or not a :class:`fastema.torch.compat.EMA`; with ``lazy_init_ema=True`` the
    routes are hooked at the first ``update()`` (ema-pytorch never hooks them).
    """

    def __init__(self, model: nn.Module, ema: EMA | None = None, ema_module_kwargs=None,
                 default_ema_kwarg: str = "ema_output", forward_online_during_train: bool = True, **ema_kwargs):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMAModuleWrapper takes an nn.Module, got {type(model).__name__}; for a tree of "
                            f"tensors use fastema.torch.compat.EMA(tree)")
        if ema is None:
            ema = EMA(model, **ema_kwargs)
        else:
            if ema_kwargs:
                raise ValueError(f"got ema= and EMA arguments {sorted(ema_kwargs)}; give the arguments to the EMA "
                                 f"you pass, or pass no ema=")
            if not isinstance(ema, EMA):
                raise TypeError(f"ema= must be a fastema.torch.compat.EMA, got {type(ema).__module__}."
                                f"{type(ema).__name__}; make it with fastema.torch.compat.EMA(model, ...)")
            if ema.model is not model:
                raise ValueError("ema= averages another model than model=; pass the model the EMA was made with")
        self._hook_handles: list = []
        self._captured_ema_outputs: dict = {}
        self._hooked = False
        self.ema_module_kwargs = ema_module_kwargs
        self.default_ema_kwarg = default_ema_kwarg
        self.forward_online_during_train = forward_online_during_train
        _parse_specs(model, ema_module_kwargs, default_ema_kwarg)     # a bad form refused before anything
        self.ema = ema
        self.register_ema_module_hooks()

    @property
    def model(self) -> nn.Module:
        """The online model (the EMA's)."""
        return self.ema.model

    @property
    def ema_model(self) -> nn.Module | None:
        """The averaged copy (the EMA's)."""
        return self.ema.ema_model

    def update(self):
        """The EMA's :meth:`EMA.update` (and, after a lazy first copy, the routes' hooks)."""
        out = self.ema.update()
        if not self._hooked and self.ema.ema_model is not None:
            self.register_ema_module_hooks()
        return out

    def update_model_with_ema(self, decay: float | None = None):
        """The EMA's :meth:`EMA.update_model_with_ema`."""
        return self.ema.update_model_with_ema(decay=decay)

    def eval(self):
        """The EMA copy's ``eval()`` (as ema-pytorch: the online model keeps its mode)."""
        return self.ema.eval()

    def forward_eval(self, *args, **kwargs):
        """The EMA's :meth:`EMA.forward_eval`: the EMA copy under ``no_grad``."""
        return self.ema.forward_eval(*args, **kwargs)

    def remove_ema_module_hooks(self) -> None:
        """Take the routes' hooks off both models."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._hooked = False

    def register_ema_module_hooks(self) -> None:
        """(Re)hook the routes of ``ema_module_kwargs``: a forward hook on each EMA copy submodule
        keeps its output, a pre-hook on each receiver passes it as the keyword. Every route is
        checked before the first hook is placed."""
        self.remove_ema_module_hooks()
        if self.ema_module_kwargs is None or self.ema_model is None:
            return
        routes = []
        for spec in _parse_specs(self.model, self.ema_module_kwargs, self.default_ema_kwarg):
            ema_sub = _submodule(self.ema_model, spec.ema_path, "the EMA module path")
            receiver = _submodule(self.model, spec.receiver_path, "the receiving module path")
            params = inspect.signature(receiver.forward).parameters
            if spec.kwarg_name not in params and not any(p.kind == inspect.Parameter.VAR_KEYWORD
                                                         for p in params.values()):
                raise AssertionValueError(f"submodule {spec.receiver_path!r} ({type(receiver).__name__}) has no "
                                          f"forward keyword argument {spec.kwarg_name!r} to receive the EMA output "
                                          f"of {spec.ema_path!r}; add it to its forward or name another with "
                                          f"ema_kwarg=")
            routes.append((spec, ema_sub, receiver))
        captured = self._captured_ema_outputs
        for spec, ema_sub, receiver in routes:
            def keep(module, args, output, path=spec.ema_path, transform=spec.transform):
                captured[path] = output if transform is None else transform(output)

            def give(module, args, kwargs, path=spec.ema_path, name=spec.kwarg_name):
                if path in captured:
                    kwargs[name] = captured[path]
                return args, kwargs

            self._hook_handles.append(ema_sub.register_forward_hook(keep))
            self._hook_handles.append(receiver.register_forward_pre_hook(give, with_kwargs=True))
        self._hooked = True

    def forward_online(self, *args, only_online: bool = False, only_ema: bool = False, ema_args=None,
                       ema_kwargs: dict | None = None, auto_normalize_ema_args: bool = True, **kwargs):
        """Run the EMA copy (``no_grad``, eval mode; on ``ema_args`` / ``ema_kwargs`` when given,
        else on the same inputs), then the online model, which receives the routed outputs;
        returns the online model's output. ``only_online`` / ``only_ema``: that model alone; both,
        or either with ``ema_args`` / ``ema_kwargs``, raise :class:`AssertionValueError` (an
        ``AssertionError`` where ema-pytorch asserts, and a ``ValueError``)."""
        if only_online and only_ema:
            raise AssertionValueError("only_online=True and only_ema=True together; pick one")
        if (only_online or only_ema) and (ema_args is not None or ema_kwargs is not None):
            raise AssertionValueError("ema_args / ema_kwargs are for the EMA copy's pass of a routed forward; "
                                      "drop them with only_online=True or only_ema=True")
        if only_ema:
            return self.ema._made()(*args, **kwargs)
        if only_online:
            self._captured_ema_outputs.clear()
            return self.model(*args, **kwargs)
        if self.ema.ema_model is None:                     # ema-pytorch asserts here
            raise AssertionRuntimeError("the EMA copy is not made yet (lazy_init_ema=True): call update() once "
                                        "first")
        ema_model = self.ema.ema_model
        self._captured_ema_outputs.clear()
        if auto_normalize_ema_args and ema_args is not None:
            if isinstance(ema_args, dict):                 # ema-pytorch's normalize_ema_args_kwargs
                ema_args, ema_kwargs = (), {**ema_args, **(ema_kwargs or {})}
            elif not isinstance(ema_args, tuple):
                ema_args = (ema_args,)
        with torch.no_grad():
            training = ema_model.training
            ema_model.eval()
            ema_model(*(args if ema_args is None else ema_args), **(kwargs if ema_kwargs is None else ema_kwargs))
            ema_model.train(training)
        out = self.model(*args, **kwargs)
        self._captured_ema_outputs.clear()
        return out

    def forward(self, *args, forward_online: bool | None = None, only_online: bool = False, only_ema: bool = False,
                ema_args=None, ema_kwargs: dict | None = None, auto_normalize_ema_args: bool = True, **kwargs):
        """The routed forward (:meth:`forward_online`) while the online model trains and routes are
        given (or ``forward_online=True``, ``only_online``, ``only_ema``); else ``ema_model(...)``."""
        if forward_online is None:
            forward_online = self.ema_module_kwargs is not None and self.model.training and \
                self.forward_online_during_train
        if only_online or only_ema or forward_online:
            return self.forward_online(*args, only_online=only_online, only_ema=only_ema, ema_args=ema_args,
                                       ema_kwargs=ema_kwargs, auto_normalize_ema_args=auto_normalize_ema_args,
                                       **kwargs)
        return self.ema._made()(*args, **kwargs)
