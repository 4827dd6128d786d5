"""Sphinx configuration for st_predict (scverse cookiecutter layout: myst-nb, autosummary, numpydoc).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (or ``make docs``).
The build needs no network. ``ST_PREDICT_DOCS_INTERSPHINX=1`` turns on links to the docs of
Python, numpy, pandas, AnnData, scanpy, squidpy, scvi-tools, torch and Lightning (fetched at build time).
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent

# -- Project information -------------------------------------------------------------------------
_meta = metadata("st-predict")
project = "st_predict"
author = _meta.get("Author") or "st_predict developers"
copyright = f"{datetime.now():%Y}, {author}"
version = _meta["Version"]
release = version

# -- Tutorials: ../tutorials/*.ipynb are copied into docs/tutorials/ (gitignored) ------------------
# Sphinx only sees files under docs/. Notebooks are executed by tests elsewhere and committed with
# their outputs, so they are rendered as they are (nb_execution_mode = "off").
_TUTORIALS_SRC = ROOT / "tutorials"
_TUTORIALS_DST = HERE / "tutorials"


def _sync_tutorials() -> list[str]:
    notebooks = sorted(_TUTORIALS_SRC.glob("*.ipynb")) if _TUTORIALS_SRC.is_dir() else []
    _TUTORIALS_DST.mkdir(exist_ok=True)
    keep = {nb.name for nb in notebooks}
    for stale in _TUTORIALS_DST.glob("*.ipynb"):
        if stale.name not in keep:
            stale.unlink()
    for nb in notebooks:
        dst = _TUTORIALS_DST / nb.name
        if not dst.exists() or dst.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, dst)
    return sorted(keep)


_tutorials = _sync_tutorials()

# -- Command-line reference: docs/cli.md (gitignored) is written from the argparse parser at every build
from st_predict.cli import cli_reference_markdown

(HERE / "cli.md").write_text(cli_reference_markdown())


# -- The encoders of the lazyslide-models registry: docs/user_guide/_encoder_keys.md (gitignored), at every build
def _encoder_keys_markdown() -> str:
    from st_predict.nn import registry_vision_keys

    keys = registry_vision_keys()
    if not keys:
        return "*(lazyslide-models is not installed where these docs were built: `pip install 'st-predict[wsi]'`.)*\n"

    def text(value) -> str:
        if value is None:
            return ""
        return ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)

    import lazyslide_models

    lines = [
        f"The vision models of lazyslide-models {lazyslide_models.__version__} (generated when these docs were built):",
        "",
        "| key | model | parameters | feature size | gated | licence | commercial use |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, cls in sorted(keys.items()):
        url = getattr(cls, "hf_url", None) or getattr(cls, "github_url", None)
        name = f"[{cls.__name__}]({url})" if url else cls.__name__
        commercial = {True: "yes", False: "no"}.get(getattr(cls, "commercial", None), "")
        lines.append(
            f"| `{key}` | {name} | {text(getattr(cls, 'param_size', None))} | {text(getattr(cls, 'encode_dim', None))} "
            f"| {'yes' if getattr(cls, 'is_gated', False) else 'no'} | {text(getattr(cls, 'license', None))} | {commercial} |"
        )
    return "\n".join(lines) + "\n"


(HERE / "user_guide" / "_encoder_keys.md").write_text(_encoder_keys_markdown())

# -- General configuration -----------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxcontrib.bibtex",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "user_guide/_encoder_keys.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
pygments_style = "default"

# autodoc / autosummary / napoleon (numpy docstrings, types in signatures)
def _own_members() -> dict[str, list[str]]:
    """For each public class: the members that st_predict's own classes define (the class and its
    mixins), so a class page lists its mixins' methods but not torch's, Lightning's or scvi-tools'."""
    import importlib
    import inspect

    out = {}
    for modname in ("st_predict", *(f"st_predict.{s}" for s in ("data", "pp", "nn", "module", "train", "metrics", "pl",
                                                                 "benchmark"))):
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if inspect.isclass(obj):
                own = set()
                for klass in obj.__mro__:
                    if klass.__module__.startswith("st_predict"):
                        own.update(vars(klass))
                out[f"{modname}.{name}"] = sorted(own)
    return out


autosummary_context = {"st_members": _own_members()}
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = False
# Overridden torch / Lightning hooks without a docstring of their own stay undocumented here rather
# than inheriting their base class's docstring (written for those projects' Sphinx setups).
autodoc_inherit_docstrings = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True

# myst / myst-nb
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_output_stderr = "remove"
nb_merge_streams = True

# bibliography
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"

# Tutorials: tutorials.md globs tutorials/*. With no notebook yet the glob would match nothing and
# Sphinx warns (a warning that suppress_warnings cannot silence in every Sphinx version), so the
# toctree is dropped from the page and a "no tutorials yet" note is shown instead.
if not _tutorials:
    tags.add("no_tutorials")  # noqa: F821 - ``tags`` is injected by Sphinx


def _drop_empty_tutorials_toctree(app, docname: str, source: list[str]) -> None:
    if docname == "tutorials" and not _tutorials:
        source[0] = re.sub(r"```\{toctree\}.*?```\n?", "", source[0], flags=re.DOTALL)


def setup(app):
    app.connect("source-read", _drop_empty_tutorials_toctree)


# Optional intersphinx (needs the network at build time, so it is opt-in).
if os.environ.get("ST_PREDICT_DOCS_INTERSPHINX", "").lower() in ("1", "true", "yes"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
        "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
    }

# -- HTML output ---------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "st_predict"
html_show_sphinx = False
html_theme_options = {
    "use_repository_button": False,
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
