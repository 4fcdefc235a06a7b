"""Sphinx configuration for fastema's documentation.

Build (warnings are errors, as in CI)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html -q

Kept lean: autodoc + napoleon (the docstrings are Google style) + autosummary + myst-parser
for the Markdown pages, and two local extensions in ``docs/ext``. No intersphinx (no network).
"""
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE / "ext"))
sys.path.insert(0, str(HERE.parent))  # the tree being documented, installed or not

# Quiet framework imports: autodoc imports fastema.jax / .tensorflow / .keras / .lightning.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "torch")

project = "fastema"
author = "fastema developers"
copyright = "fastema developers"
release = version = "0.2.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.autosummary",
    "myst_parser",
    "public_api",       # docs/ext/public_api.py: ``.. public-summary:: module`` (a table of its __all__)
    "coverage_check",   # docs/ext/coverage_check.py: every public name documented, with a docstring
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "ext", "Thumbs.db", ".DS_Store"]
templates_path = []

# autodoc: members follow each module's __all__ (imported names included), in __all__'s order.
# Inherited members: the faces inherit their public methods (swap, average_parameters, state_dict...)
# from shared engine classes; those of torch.nn.Module, the Keras/Lightning Callback and
# torch.Tensor (SplitEntry is a Tensor subclass; its members are torch's, TensorBase's) are not ours.
autodoc_default_options = {"member-order": "bysource", "show-inheritance": True,
                           "inherited-members": "Module, Callback, Tensor, TensorBase"}
autodoc_typehints = "description"
# Only docstrings fastema wrote: an override of torch.nn.Module.eval must not borrow torch's (its
# cross-references point into torch's own docs).
autodoc_inherit_docstrings = False
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_mock_imports = []           # every framework is importable in the dev venv
autosummary_generate = False        # the API pages are written by hand (one section per name)

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "fastema"
html_static_path = []
html_theme_options = {"description": "Fast, exact moving averages of model weights and metrics",
                      "fixed_sidebar": True}

