"""Sphinx configuration of attnkit's API reference, built from the docstrings.

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs/api build/api

Warnings are errors (``-W``), in CI too (``.ci/run``) and in ``tests/test_docs_build.py``.
"""

import os
import sys

# the source tree first, so the reference documents this checkout even without an install
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src")))

import attnkit  # noqa: E402

project = "attnkit"
author = "the attnkit authors"
copyright = "the attnkit authors"
version = release = attnkit.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]

# docstrings are Google style ("Args:", "Returns:") with "Example::" literal blocks
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# members are listed per directive (":members:" in each page)
autodoc_default_options = {"show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# the signatures show the names the user writes (Tensor), not torch's private module paths
autodoc_type_aliases = {"Tensor": "torch.Tensor"}

# cross-references to objects outside attnkit (torch, numpy) are not resolved: no intersphinx,
# the build needs no network
nitpicky = False

html_theme = "alabaster"
html_title = f"attnkit {release} API reference"
exclude_patterns = ["_build"]
