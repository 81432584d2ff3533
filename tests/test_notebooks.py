"""Execute the notebooks in ``notebooks/`` end to end: they are documentation that must
keep working. Each is small enough to run in CI."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_without_error(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_with_its_outputs(path):
    """A reader on the web sees the results: every code cell was run, in order, the
    figures are embedded, and no tqdm ``IProgress not found`` warning shows."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert None not in counts and counts == sorted(counts)
    outputs = [out for c in code for out in c.get("outputs", [])]
    assert any("image/png" in out.get("data", {}) for out in outputs)
    shown = [str(out) for out in outputs]
    assert not [t for t in shown if "IProgress" in t]
    assert all(out.get("output_type") != "error" for out in outputs)
