"""The documentation builds with warnings as errors, offline, and lists the whole public API."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SUBPACKAGES = ("data", "pp", "nn", "module", "train", "dataloaders", "metrics", "pl", "benchmark", "tl", "model", "cli")

pytest.importorskip("sphinx", reason="needs the docs dependency group (pip install -e . --group docs)")
pytest.importorskip("myst_nb", reason="needs the docs dependency group (pip install -e . --group docs)")

# a 1 x 1 PNG, as a committed notebook output would carry a figure
_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _source_tree(dest: Path) -> Path:
    """Copy what the docs build reads (docs/, tutorials/, CHANGELOG.md) to ``dest``, leaving out
    build outputs, so that building never writes into the repository."""
    ignore = shutil.ignore_patterns("_build", "generated", "tutorials", ".ipynb_checkpoints")
    shutil.copytree(DOCS, dest / "docs", ignore=ignore)
    (dest / "tutorials").mkdir()
    if (ROOT / "tutorials").is_dir():
        for nb in (ROOT / "tutorials").glob("*.ipynb"):
            shutil.copy(nb, dest / "tutorials" / nb.name)
    shutil.copy(ROOT / "CHANGELOG.md", dest / "CHANGELOG.md")
    return dest / "docs"


def _sphinx_build(src: Path, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ST_PREDICT_DOCS_INTERSPHINX"}  # offline build
    env["MPLBACKEND"] = "agg"
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "-d",
        str(out / "doctrees"),
        str(src),
        str(out / "html"),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _check(res: subprocess.CompletedProcess) -> None:
    log = res.stdout + res.stderr
    problems = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert res.returncode == 0, "sphinx-build -W failed:\n" + "\n".join(problems or log.splitlines()[-40:])


_SMOKE = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "cells": [
        {
            "cell_type": "markdown",
            "id": "a1",
            "metadata": {},
            "source": ["# Docs smoke tutorial\n", "\n", "Text."],
        },
        {
            "cell_type": "code",
            "id": "a2",
            "metadata": {},
            "execution_count": 1,
            "source": ["print('stored output')"],
            "outputs": [
                {"output_type": "stream", "name": "stdout", "text": ["stored output\n"]},
                {
                    "output_type": "display_data",
                    "metadata": {},
                    "data": {"image/png": _PNG, "text/plain": ["<Figure size 1x1>"]},
                },
            ],
        },
    ],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One ``sphinx-build -W --keep-going -b html`` of the docs as they are, plus a smoke notebook in
    ``tutorials/`` (a copy: the repository is never written); the HTML folder."""
    tmp = tmp_path_factory.mktemp("docs")
    src = _source_tree(tmp / "src")
    (tmp / "src" / "tutorials" / "zz_docs_smoke.ipynb").write_text(json.dumps(_SMOKE))
    _check(_sphinx_build(src, tmp / "out"))
    return tmp / "out" / "html"


@pytest.mark.slow
def test_docs_build(built):
    """The build succeeds with warnings as errors and has every page."""
    html = built
    for page in (
        "index",
        "install",
        "api",
        "tutorials",
        "changelog",
        "user_guide/nh2st",
        "user_guide/evaluation",
        "cli",
    ):
        assert (html / f"{page}.html").is_file(), page
    cli = (html / "cli.html").read_text()  # written from the parser at build time
    for command in ("train", "predict", "predict-slide", "evaluate", "benchmark", "demo"):
        assert f"st-predict {command}" in cli, command
    assert "--resume" in cli and "--sections" in cli
    nh2st = (html / "generated" / "st_predict.NH2ST.html").read_text()
    for method in ("setup_anndata", "train", "predict", "get_predicted_expression", "save", "load"):
        assert f"NH2ST.{method}" in nh2st, method


@pytest.mark.slow
def test_docs_build_renders_tutorial_notebooks(built):
    """A notebook in ``tutorials/`` is copied into the docs and rendered with its stored outputs."""
    page = built / "tutorials" / "zz_docs_smoke.html"
    assert page.is_file()
    text = page.read_text()
    assert "Docs smoke tutorial" in text and "stored output" in text  # rendered, not executed
    assert "zz_docs_smoke.html" in (built / "tutorials.html").read_text()
    for name in ("01_quickstart", "02_predict_he_only_spatialdata", "03_benchmark_ablations", "04_whole_slide"):
        assert (built / "tutorials" / f"{name}.html").is_file(), name


def test_api_page_lists_every_public_name():
    """docs/api.md names every entry of each subpackage's ``__all__`` (add new functions there)."""
    api = (DOCS / "api.md").read_text()
    listed = set(re.findall(r"^\s+([A-Za-z_][\w.]*)\s*$", api, flags=re.MULTILINE))
    missing = []
    for sub in SUBPACKAGES:
        mod = importlib.import_module(f"st_predict.{sub}")
        missing += [f"{sub}.{name}" for name in mod.__all__
                    if f"{sub}.{name}" not in listed and name not in listed]  # model.NH2ST is listed as NH2ST
    if "NH2ST" not in listed:
        missing.append("NH2ST")
    assert not missing, f"docs/api.md lacks {missing}: add them to the autosummary block of their subpackage."
