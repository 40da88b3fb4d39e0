"""Paper-style figures and tables from results on disk only (no training): `make figures`.

    python -m loralab.figures [--results results] [--experiment <name>] [--out figures]

Every experiment found under `--results` (a results root, or a Hydra sweep directory) gets `<out>/<experiment>/`
with each item as PNG (plots) + Markdown + LaTeX + CSV and an `index.md`; `<out>/index.md` lists the experiments
and `<out>/claims.md` gives each paper finding its verdict (loralab.claims). Tables aggregate seeds (mean ± std, n),
choose settings by identity (`loralab.figures.data`) and stand beside the papers' numbers where a preset
corresponds. The notebooks call the same functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from loralab.figures import data
from loralab.figures.data import SETUP
from loralab.figures.output import Writer
from loralab.figures.sections import (
    amplification_section,
    best_epoch_section,
    convergence_section,
    describe,
    rank_section,
    spectrum_section,
    subspace_section,
    training_length_section,
    variants_section,
)


def render_experiment(frame: pd.DataFrame, results, out: Path) -> Writer:
    metric = data.main_metric(frame)
    w = Writer(out, describe(frame))
    varying = [c for c in ("variant", "targets", "rank", "lr", "seed") if frame[c].astype(str).nunique() > 1]
    w.text([f"{len(frame)} completed runs; they vary in: {', '.join(varying) or 'nothing'}."])
    if metric:
        rank_section(w, frame, metric, results)
        variants_section(w, frame, metric, results)
        best_epoch_section(w, frame, metric)
    subspace_section(w, frame)
    amplification_section(w, frame, results)
    convergence_section(w, frame, results)
    spectrum_section(w, frame)
    training_length_section(w, frame)
    return w


def render(results: str | Path, out: str | Path, experiment: str | None = None) -> Path:
    """Every experiment under `results` (or only `experiment`) into `out`; returns `out`/index.md."""
    from loralab.claims import claims_markdown, evaluate  # noqa: PLC0415  (claims import figures.data)

    frame = data.runs_frame(results, experiment)
    if frame.empty:
        raise SystemExit(f"no completed runs{f' of experiment {experiment!r}' if experiment else ''} under {results}")
    out = Path(out)
    entries = {}
    for key, part in frame.groupby(SETUP):
        name = (
            key[0]
            if frame[frame.experiment == key[0]][["model", "task"]].drop_duplicates().shape[0] == 1
            else "-".join(key)
        )
        w = render_experiment(part.reset_index(drop=True), results, out / name)
        w.finish(f"{key[0]}: {key[1]} on {key[2]}")
        entries[name] = f"{len(part)} runs — {', '.join(dict.fromkeys(w.written)) or 'no items'}"
        evaluate(part.reset_index(drop=True)).assign(experiment=name).to_csv(out / name / "claims.csv", index=False)
    # the overview covers every experiment folder under `out`: a render narrowed to one experiment (EXPERIMENT=)
    # replaces that experiment's part and keeps the others'
    for index in out.glob("*/index.md"):
        entries.setdefault(index.parent.name, index.read_text().splitlines()[0].removeprefix("# "))
    verdicts = [pd.read_csv(p) for p in sorted(out.glob("*/claims.csv"))]
    (out / "claims.md").write_text(claims_markdown(pd.concat(verdicts, ignore_index=True)))
    lines = ["# loralab figures", "", *(f"- [{n}]({n}/index.md): {entries[n]}" for n in sorted(entries))]
    lines += ["", "Paper claims with verdicts: [claims.md](claims.md)"]
    (out / "index.md").write_text("\n".join(lines) + "\n")
    return out / "index.md"


def main(argv=None) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # the command line only: notebooks keep their inline backend
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="a results root or a Hydra sweep directory")
    parser.add_argument("--experiment", default=None, help="only this experiment (default: every one found)")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)
    print(f"[loralab.figures] wrote {render(args.results, args.out, args.experiment)}")
