"""Writing one figure set: each table as CSV + Markdown + LaTeX (compiles with pdflatex + booktabs), each plot as
PNG, and an index.md that shows them in order."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from loralab.latex import latex_table


class Writer:
    def __init__(self, out: str | Path, ours: str):
        self.out, self.ours = Path(out), ours
        self.out.mkdir(parents=True, exist_ok=True)
        self.index: list[str] = []
        self.written: list[str] = []

    def table(self, name: str, title: str, table: pd.DataFrame, note: str = "", paper=None, paper_setup: str = ""):
        table.to_csv(self.out / f"{name}.csv")
        (self.out / f"{name}.tex").write_text(latex_table(table, caption=title, label=f"tab:{name}"))
        md = [f"## {title}", "", f"*Ours: {note or self.ours}*", "", table.to_markdown()]
        if paper is not None:
            paper.to_csv(self.out / f"{name}_paper.csv", index=False)
            md += ["", f"*Paper: {paper_setup}*", "", paper.to_markdown(index=False)]
        (self.out / f"{name}.md").write_text("\n".join(md) + "\n")
        self.index += md + [""]
        self.written.append(name)

    def figure(self, name: str, fig, caption: str):
        fig.savefig(self.out / f"{name}.png", dpi=120, bbox_inches="tight")
        self.index += [f"![{caption}]({name}.png)", "", f"*{caption}*", ""]
        self.written.append(name)

    def text(self, lines: list[str]):
        self.index += [*lines, ""]

    def finish(self, title: str) -> Path:
        path = self.out / "index.md"
        path.write_text("\n".join([f"# {title}", "", *self.index]))
        return path
