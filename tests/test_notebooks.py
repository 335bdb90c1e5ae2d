"""Every notebook in notebooks/ runs top to bottom, and its outputs need no internet."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

_REMOTE_CODE = re.compile(r"""(src=|import\(|require\(|from )\s*\\?["']https?://|"""
                          r"cdn\.plot\.ly/plotly|cdn\.jsdelivr|unpkg\.com")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_offline(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    needs = nb.metadata.get("promptscope", {}).get("needs")
    if needs:  # e.g. "api-server": the test that starts that server runs it (tests/test_api.py)
        pytest.skip(f"needs {needs}; executed by the tests that provide it")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    for cell in nb.cells:  # expected mistakes show a one-paragraph message, not a traceback
        if "raises-exception" in cell.metadata.get("tags", []):
            shown = "".join(o.get("text", "") for o in cell.outputs)
            assert shown.startswith("UsageError: ") and "Traceback" not in shown
            assert len(shown.splitlines()) <= 3
        else:  # and the examples run clean: no warning (ours or a library's) in front of users
            noise = [o.text for o in cell.get("outputs", [])
                     if o.output_type == "stream" and o.name == "stderr" and "arning" in o.text]
            assert not noise, noise
    # Nothing loads code from the network: no script or module URL, no plotly.js from a CDN.
    # Widget front-end code is inlined in the widget state (anywidget's _esm: plotly.js itself,
    # whose map traces mention CDNs we never use); check it is code, not a URL, then skip it.
    states = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    for model in states.get("state", {}).values():
        esm = model.get("state", {}).pop("_esm", None)
        assert esm is None or not esm.lstrip().startswith("http")
    text = nbformat.writes(nb)
    assert not _REMOTE_CODE.search(text), _REMOTE_CODE.search(text)
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)
