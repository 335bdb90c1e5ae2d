"""The one way the ``make_*_notebook.py`` scripts write a notebook: cells with no outputs (CI
executes them) and a Python 3 kernel.

    from notebook_cells import Cells
    cells = Cells()
    cells.md("# Title")
    cells.code("import promptscope")
    cells.code("%%prompt --bad", tags=["raises-exception"])
    cells.write(Path("notebooks/99_example.ipynb"))
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


class Cells(list):
    """Markdown and code cells in order; ``md(text)``, ``code(text, tags=[...])``."""

    @classmethod
    def of(cls, pairs: list[tuple[str, str]]) -> Cells:
        """From ``("md" | "code", source)`` pairs."""
        cells = cls()
        for kind, source in pairs:
            getattr(cells, kind)(source)
        return cells

    def md(self, text: str) -> None:
        self.append(new_markdown_cell(text.strip()))

    def code(self, text: str, tags: list[str] | None = None) -> None:
        self.append(new_code_cell(text.strip(), metadata={"tags": tags} if tags else {}))

    def notebook(self) -> nbformat.NotebookNode:
        for i, cell in enumerate(self):
            cell["id"] = f"cell-{i:02d}"  # stable ids: a regenerated notebook diffs only its text
        return new_notebook(cells=list(self), metadata={"kernelspec": KERNEL})

    def write(self, path: Path) -> None:
        nbformat.write(self.notebook(), path)
        print(f"wrote {path}")
