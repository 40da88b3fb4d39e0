"""What the notebooks share: the selected runs split by (experiment, model, task), and a stand-in for the figure
set's Writer that keeps the tables a section of `loralab.figures.sections` builds, so a notebook shows exactly
what `make figures` writes (the section's own plots are closed; notebooks draw theirs with `plots`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from loralab.figures import data
from loralab.figures.sections import describe


def setups(results: str | Path, experiment: str | None = None) -> dict[str, pd.DataFrame]:
    """Completed runs per '<experiment>/<model>/<task>', with a one-line description of each printed."""
    runs = data.runs_frame(results, experiment)
    out = {"/".join(key): part.reset_index(drop=True) for key, part in runs.groupby(data.SETUP)} if len(runs) else {}
    print(f"{len(runs)} completed runs under {results}" + (f", experiment {experiment}" if experiment else ""))
    for name, frame in out.items():
        print(f"- {name}: {describe(frame)}")
    return out


class Tables:
    def __init__(self, section, *args):
        self.found, self.figures = {}, {}
        section(self, *args)

    def table(self, name, title, table, note="", paper=None, paper_setup=""):
        self.found[name] = (title, table, paper, paper_setup)

    def figure(self, name, fig, caption):
        import matplotlib.pyplot as plt  # noqa: PLC0415

        plt.close(fig)  # not drawn where the section runs; `plot(name)` shows it
        self.figures[name] = fig

    def text(self, lines):
        pass

    def show(self, name, missing="the runs it needs are missing"):
        from IPython.display import Markdown, display  # noqa: PLC0415  (only inside a notebook)

        if name not in self.found:
            print(f"(no {name} table: {missing})")
            return
        title, table, paper, paper_setup = self.found[name]
        display(Markdown(f"**{title}**"), table)
        if paper is not None:
            display(Markdown(f"*Paper: {paper_setup}*"), paper)

    def plot(self, name, missing="the runs it needs are missing"):
        from IPython.display import display  # noqa: PLC0415

        if name in self.figures:
            display(self.figures[name])
        else:
            print(f"(no {name} plot: {missing})")


def paper_claims(setups: dict[str, pd.DataFrame], paper: str) -> pd.DataFrame:
    """`loralab.claims.evaluate` per setup, the claims of one paper ('LoRA', 'LoRA-GA', 'LieRA')."""
    from loralab.claims import evaluate  # noqa: PLC0415  (claims import this package)

    columns = ["setup", "claim", "statement", "measured", "value", "threshold", "n", "ci_low", "ci_high", "verdict"]
    verdicts = [evaluate(frame).assign(setup=name) for name, frame in setups.items()]
    if not verdicts:
        return pd.DataFrame(columns=columns)
    verdicts = pd.concat(verdicts, ignore_index=True)
    verdicts = verdicts[verdicts.paper.str.split().str[0] == paper]
    return verdicts[[c for c in columns if c in verdicts]]
