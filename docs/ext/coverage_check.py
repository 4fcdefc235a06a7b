"""Fail the docs build when a public name is not documented, or has no docstring.

The public surface is the ``__all__`` of each module in :data:`PUBLIC_MODULES` (the import
paths fastema promises to keep). A name counts as documented when the API pages describe
it under that module (``fastema.posthoc.synthesize``) or describe the same object under
another public path (``fastema.flat.FlatShadow`` is ``fastema.FlatShadow``). A name that is a
module counts when that module has its own page (``.. automodule::``).

Two ways to run it (optax's ``docs/ext/coverage_check.py`` is the model):

- as a Sphinx extension (``docs/conf.py`` loads it): each problem is a Sphinx warning,
  which ``sphinx -W`` turns into a failed build;
- after a build, as a script that reads the built site's ``objects.inv``::

      .venv/bin/python docs/ext/coverage_check.py docs/_build/html

  It prints every problem and exits 1 if there is any.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
from typing import Iterable

#: The public modules whose ``__all__`` must be documented (layout.md §7, "Public import paths stay").
PUBLIC_MODULES = (
    "fastema",
    "fastema.flat",
    "fastema.pairs",
    "fastema.smooth",
    "fastema.schedules",
    "fastema.average",
    "fastema.posthoc",
    "fastema.merge",
    "fastema.torch",
    "fastema.torch.compat",
    "fastema.torch.engines",
    "fastema.jax",
    "fastema.tensorflow",
    "fastema.tensorflow.compat",
    "fastema.keras",
    "fastema.lightning",
    "fastema.transformers",
    "fastema.trl",
    "fastema.torchtitan",
)


def _resolve(fullname: str):
    """The object a dotted name documents, or None when it does not import."""
    parts = fullname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _attr_doc(module: types.ModuleType, name: str, value) -> bool:
    """True when a module-level constant has a ``#:`` comment or a docstring after it, in any
    fastema module that binds the same object under that name (where it is defined)."""
    from sphinx.pycode import ModuleAnalyzer

    candidates = [module] + [m for k, m in sorted(sys.modules.items())
                             if k.startswith("fastema") and m is not module and getattr(m, name, None) is value]
    for mod in candidates:
        try:
            docs = ModuleAnalyzer.for_module(mod.__name__).find_attr_docs()
        except Exception:  # noqa: BLE001 - no source (a C module): nothing to find
            continue
        if any("".join(lines).strip() for lines in [docs.get(("", name), [])]):
            return True
    return False


def _has_docstring(module: types.ModuleType, name: str, obj) -> bool:
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)) or callable(obj):
        doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)  # a class's own, never a base's
        return bool(doc and doc.strip())
    return _attr_doc(module, name, obj)


def problems(documented: Iterable[str], modules: Iterable[str] = PUBLIC_MODULES) -> list[str]:
    """Every public name that is undocumented or has no docstring, one message each.

    Args:
        documented: the dotted names the built docs describe (Python-domain objects and modules).
        modules: the public modules to check.

    Returns:
        The messages; empty when every public name is documented and has a docstring.
    """
    documented = set(documented)
    ids = None  # id() of every documented object, built on the first re-export seen
    out = []
    for modname in modules:
        try:
            module = importlib.import_module(modname)
        except Exception as e:  # noqa: BLE001 - report, don't crash the build
            out.append(f"{modname}: cannot be imported ({type(e).__name__}: {e})")
            continue
        if modname not in documented:
            out.append(f"{modname}: the module has no API page (add '.. automodule:: {modname}' under docs/api/)")
        public = getattr(module, "__all__", None)
        if public is None:
            out.append(f"{modname}: a public module without __all__")
            continue
        for name in public:
            full = f"{modname}.{name}"
            if not hasattr(module, name):
                out.append(f"{full}: listed in __all__ but not defined")
                continue
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                if obj.__name__ not in documented:
                    out.append(f"{full}: module {obj.__name__} has no API page")
                continue
            if full not in documented:
                if ids is None:
                    ids = {id(o) for o in map(_resolve, sorted(documented)) if o is not None}
                if id(obj) not in ids or isinstance(obj, (int, float, str, bytes, tuple)):
                    out.append(f"{full}: public (in {modname}.__all__) but not in the API pages")
            if not _has_docstring(module, name, obj):
                out.append(f"{full}: public but has no docstring")
    return out


def _documented_in_env(env) -> set[str]:
    py = env.get_domain("py")
    return set(py.objects) | set(py.modules)


def _check(app, env) -> None:
    from sphinx.util import logging

    logger = logging.getLogger("fastema.coverage_check")
    for message in problems(_documented_in_env(env)):
        logger.warning("API coverage: %s", message, type="fastema", subtype="coverage")


def setup(app):
    app.connect("env-check-consistency", _check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: list[str] | None = None) -> int:
    """Check a built site: ``python docs/ext/coverage_check.py docs/_build/html``."""
    from sphinx.util.inventory import InventoryFile

    argv = sys.argv[1:] if argv is None else argv
    site = argv[0] if argv else os.path.join(os.path.dirname(__file__), "..", "_build", "html")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    with open(os.path.join(site, "objects.inv"), "rb") as f:
        inv = InventoryFile.load(f, "", os.path.join)
    documented = {name for kind, entries in getattr(inv, "data", inv).items() if kind.startswith("py:")
                  for name in entries}
    found = problems(documented)
    for message in found:
        print(f"API coverage: {message}")
    names = sum(len(getattr(importlib.import_module(m), "__all__", ())) for m in PUBLIC_MODULES)
    print(f"API coverage: {len(PUBLIC_MODULES)} modules, {names} public names, {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
