"""The quick-start notebook runs top to bottom (on a tiny set, so it cannot rot)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    for key, value in {
        "HIAD_QUICKSTART_IMAGE_SIZE": "512",
        "HIAD_QUICKSTART_DIR": str(tmp_path),
        "HIAD_QUICKSTART_TRAIN": "3",
        "HIAD_QUICKSTART_GOOD": "2",
        "HIAD_QUICKSTART_DEFECT": "2",
    }.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "Task Number: 4" in outputs
    assert "|  clsname  |" in outputs and "image_auroc" in outputs
    assert "4 (512, 512)" in outputs
    assert (tmp_path / "saved_models" / "tasks.json").is_file()
