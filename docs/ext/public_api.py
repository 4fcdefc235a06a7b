"""``.. public-summary:: fastema.posthoc``: an autosummary table of a module's ``__all__``.

The table follows ``__all__`` at build time, so a name added to or removed from a module's
public list changes the table without editing the page. The full entries come from
``.. automodule:: <module>`` with ``:members:`` on the same page (autodoc follows ``__all__`` too).
Names that are modules (``fastema.posthoc`` in ``fastema.__all__``) are left out: they have pages.
"""
import importlib
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


class PublicSummary(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        try:
            module = importlib.import_module(modname)
        except Exception as e:  # noqa: BLE001 - a warning (an error under -W), not a crash
            return [self.state.document.reporter.warning(
                f"public-summary: cannot import {modname}: {type(e).__name__}: {e}", line=self.lineno)]
        names = [n for n in getattr(module, "__all__", ())
                 if not isinstance(getattr(module, n, None), types.ModuleType)]
        # A constant (MAX_DECAYS, a dict of reasons) has no docstring of its own: autosummary would show
        # its type's (``int([x]) -> integer``, or dict's, whose ``**kwargs`` is broken markup). The
        # constants are listed by name under the table; their entries are on the page (``#:`` comments
        # or ``.. py:data::``).
        constants = [n for n in names if _is_constant(getattr(module, n, None))]
        lines = [".. autosummary::", "   :nosignatures:", ""] + [f"   {modname}.{n}" for n in names
                                                                 if n not in constants]
        if constants:
            lines += ["", "Constants: " + ", ".join(f":data:`~{modname}.{n}`" for n in constants) + "."]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"<public-summary {modname}>"), self.content_offset,
                                container)
        return container.children


def _is_constant(obj) -> bool:
    """A plain value (not a class, function or module) whose docstring is its type's."""
    return (obj is not None and not isinstance(obj, (type, types.ModuleType)) and not callable(obj)
            and getattr(obj, "__doc__", None) == type(obj).__doc__)


def setup(app):
    app.add_directive("public-summary", PublicSummary)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
