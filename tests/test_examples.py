"""Executes every notebook in examples/ top to bottom in a fresh Jupyter kernel of this interpreter."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES_DIR.glob("*.ipynb"))
# ipykernel's native "python3" kernelspec runs `python -m ipykernel_launcher`, and jupyter_client starts "python" as
# sys.executable, so the kernel is this interpreter (the venv's) and sees hf_eff and its dependencies.
KERNEL_NAME = "python3"
TIMEOUT_S = 600
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # pip colours the errors that AssetUnavailableError quotes


def _client(nb) -> nbclient.NotebookClient:
    return nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(EXAMPLES_DIR)}}
    )


def test_examples_exist():
    assert NOTEBOOKS, f"no notebook in {EXAMPLES_DIR}"


def test_kernel_runs_this_interpreter():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")])
    _client(nb).execute()
    (output,) = nb.cells[0].outputs
    assert Path(output["text"].strip()) == Path(sys.executable)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == KERNEL_NAME
    executed = [
        cell.get("id") for cell in nb.cells if cell.cell_type == "code" and (cell.outputs or cell.execution_count)
    ]
    assert not executed, f"{path.name}: clear the outputs before committing (cells {executed})"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs(path: Path):
    nb = nbformat.read(path, as_version=4)
    try:
        _client(nb).execute()
    except nbclient.exceptions.CellExecutionError as error:
        if error.ename == "AssetUnavailableError":
            reason = _ANSI_ESCAPE.sub("", error.evalue)
            pytest.skip(f"{path.name} needs an asset that could not be fetched: {reason}")
        raise
