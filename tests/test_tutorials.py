"""The tutorial notebooks run top to bottom (on small synthetic data, ST_PREDICT_TUTORIAL_SMALL=1)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def test_the_tutorials_are_saved_executed_with_figures():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_predict_he_only_spatialdata.ipynb", "03_benchmark_ablations.ipynb",
        "04_whole_slide.ipynb", "05_below_the_spot.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"{path.name} is not saved executed"
        figures = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert figures, f"{path.name} has no figure in its saved outputs"
        errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name} was saved with an error"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_small_data(path, monkeypatch):
    monkeypatch.setenv("ST_PREDICT_TUTORIAL_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend captures the figures
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was produced"
    assert os.environ["ST_PREDICT_TUTORIAL_SMALL"] == "1"
