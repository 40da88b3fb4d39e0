"""`make figures` and the notebooks, the way a user gets there: a Hydra sweep of three variants × two ranks × two seeds
on a tiny model under a fresh experiment name (plus one job of another experiment in the same results root), then
the figure set, its LaTeX, and every notebook executed on those results — and on the committed ones."""

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import jupytext
import pandas as pd
import pytest
from nbclient import NotebookClient

from conftest import ROOT, run_cli
from loralab.claims import CLAIMS
from loralab.figures import render
from loralab.figures.data import runs_frame
from loralab.latex import compile_check

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
EXPERIMENT = "figcheck"  # no preset of this name: nothing in the figures may depend on a known experiment
OTHER = "figcheck_other"  # one more job under the same results root, which an EXPERIMENT-narrowed render ignores
SMALL = [
    "model=tiny_bert",
    "task.n_train=64",
    "task.n_val=40",
    "task.n_test=60",
    "train.max_steps=8",
    "train.batch_size=8",
    "logger=none",
    "train.progress=false",
]
PLOTS = (
    "table6_rank",
    "metric_vs_rank",
    "fig3_subspace_ranks",
    "fig4_subspace_seeds",
    "loraga_loss_curves",
    "dw_spectra",
)
VERDICT = re.compile(r"^(reproduced|not reproduced|inconclusive\b.*)$")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """12 jobs: variant=lora,loraga,lierra × rank=1,4 × seed=0,1, the φ pairs at those ranks and seeds; then one
    LoRA job of another experiment into the same results root."""
    root = tmp_path_factory.mktemp("figures")
    results = root / "results"
    proc = run_cli(
        "-m",
        "variant=lora,loraga,lierra",
        "rank=1,4",
        "seed=0,1",
        f"experiment_name={EXPERIMENT}",
        *SMALL,
        "analysis_steps=[2,4]",  # the training-length figure: the ΔW analyses at steps 2, 4 and the last, 8
        f"paths.results_dir={results}",
        f"hydra.sweep.dir={root}/sweep",
        "hydra.callbacks.sweep_summary.rank_pairs=[[1,4]]",
        "hydra.callbacks.sweep_summary.seed_pairs=[[0,1]]",
        "hydra.callbacks.sweep_summary.seed_pair_rank=4",
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        "variant=lora",
        "rank=4",
        f"experiment_name={OTHER}",
        *SMALL,
        f"paths.results_dir={results}",
        f"hydra.run.dir={root}/run",
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(root=root, results=results, sweep_dir=root / "sweep")


@pytest.fixture(scope="module")
def made(sweep):
    """`make figures RESULTS=... EXPERIMENT=... OUT=...`, from the repository root as a user types it."""
    if shutil.which("make") is None or not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("needs make and the project's .venv (`make setup` / `make test` create it)")
    out = sweep.root / "figs"
    proc = subprocess.run(
        # -o: never reinstall the venv from inside a test, even if pyproject.toml is newer than its stamp
        ["make", "-C", str(ROOT), "-o", ".venv/.installed", "figures"]
        + [f"RESULTS={sweep.results}", f"EXPERIMENT={EXPERIMENT}", f"OUT={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def rendered_all(sweep):
    """`render(root, out)` without an experiment: every experiment under the results root."""
    out = sweep.root / "figs_all"
    render(sweep.results, out)
    return out


def test_make_figures_renders_exactly_the_sweep(made):
    figs = made / EXPERIMENT
    index = (figs / "index.md").read_text()
    assert "12 completed runs" in index
    assert sorted(p.name for p in made.iterdir() if p.is_dir()) == [EXPERIMENT]  # OTHER's run is not in it
    assert OTHER not in (made / "index.md").read_text() and OTHER not in (made / "claims.md").read_text()
    for name in ("table6_rank", "variants_best_lr", "subspace_similarity", "table7_amplification", "dw_spectra"):
        assert {f"{name}.md", f"{name}.csv", f"{name}.tex"} <= {p.name for p in figs.iterdir()}, name
    for name in ("loraga_early_loss", "first_step_alignment"):
        assert (figs / f"{name}.csv").exists(), name
    # both seeds aggregated in every cell: mean ± std (n=2)
    table6 = pd.read_csv(figs / "table6_rank.csv", index_col=0)
    assert table6.size and table6.map(lambda c: str(c).endswith("(n=2)")).all().all(), table6
    best = pd.read_csv(figs / "variants_best_lr.csv", index_col=0)
    cells = best[[c for c in best.columns if c.startswith("test/")]]
    assert cells.size == 6 and cells.map(lambda c: " ± " in c and c.endswith("(n=2)")).all().all(), best
    assert "(n=2)" in (figs / "table6_rank.md").read_text() and "(n=2)" in (figs / "variants_best_lr.md").read_text()
    # plots with error bars / φ grids / curves, not empty axes
    for name in PLOTS:
        assert (figs / f"{name}.png").stat().st_size > 10_000, name
    # display names only
    markdown = "\n".join(p.read_text() for p in figs.glob("*.md"))
    assert "LoRA-GA" in markdown and "LieRA" in markdown
    assert "lierra" not in markdown.lower()


def test_training_length_table_and_figure_follow_the_analysed_steps(made):
    """Steps 2, 4 (analysis_steps) and 8 (the last): φ(1,1) of every variant's rank pair and basis, LoRA's
    amplification per rank and every variant's ‖ΔW‖/‖W‖, each over both seeds; ‖ΔW‖ grows with training."""
    table = pd.read_csv(made / EXPERIMENT / "training_length.csv", index_col="step")
    assert table.index.tolist() == [2, 4, 8]
    assert "φ(1,1): LoRA A_right r=1 vs 4" in table.columns and "φ(1,1): LoRA-GA dW_right r=1 vs 4" in table.columns
    assert {"amplification: LoRA r=1", "amplification: LoRA r=4", "‖ΔW‖/‖W‖: LieRA r=4"} <= set(table.columns)
    assert table.map(lambda c: str(c).endswith("(n=2)")).all().all(), table
    growth = table["‖ΔW‖/‖W‖: LoRA r=4"].map(lambda c: float(c.split()[0]))
    assert growth.is_monotonic_increasing and growth.iloc[0] > 0
    assert (made / EXPERIMENT / "training_length.png").stat().st_size > 10_000


def test_claims_md_gives_every_claim_a_verdict(made):
    text = (made / "claims.md").read_text()
    assert f"## {EXPERIMENT}" in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8:
            rows[cells[0]] = cells[-1].strip("*")
    for claim in CLAIMS:
        assert claim.id in rows, claim.id
        assert VERDICT.match(rows[claim.id]), (claim.id, rows[claim.id])


def test_render_without_experiment_renders_every_experiment(rendered_all, made):
    assert sorted(p.name for p in rendered_all.iterdir() if p.is_dir()) == sorted([EXPERIMENT, OTHER])
    assert "1 completed runs" in (rendered_all / OTHER / "index.md").read_text()
    assert "12 completed runs" in (rendered_all / EXPERIMENT / "index.md").read_text()
    claims = (rendered_all / "claims.md").read_text()
    assert f"## {EXPERIMENT}" in claims and f"## {OTHER}" in claims
    # the experiment's figure set does not depend on what else is under the root
    for csv in sorted((made / EXPERIMENT).glob("*.csv")):
        assert csv.read_text() == (rendered_all / EXPERIMENT / csv.name).read_text(), csv.name


def test_render_from_a_hydra_sweep_directory(sweep, made, tmp_path):
    index = render(sweep.sweep_dir, tmp_path / "figs")
    assert "12 completed runs" in (tmp_path / "figs" / EXPERIMENT / "index.md").read_text()
    assert OTHER not in index.read_text()
    assert sorted(p.name for p in (tmp_path / "figs" / EXPERIMENT).iterdir()) == sorted(
        p.name for p in (made / EXPERIMENT).iterdir()
    )
    for csv in sorted((made / EXPERIMENT).glob("*.csv")):
        assert csv.read_text() == (tmp_path / "figs" / EXPERIMENT / csv.name).read_text(), csv.name


def test_every_latex_table_compiles(rendered_all, tmp_path):
    texs = sorted(rendered_all.rglob("*.tex"))
    assert len(texs) >= 8
    for tex in texs:
        proc = compile_check(tex.read_text(), tmp_path / tex.parent.name / tex.stem)
        if proc is None:
            pytest.skip("pdflatex is not installed")
        assert proc.returncode == 0, f"{tex}:\n{proc.stdout[-3000:]}"


def execute(notebook: Path, monkeypatch, results: Path, experiment: str | None = None):
    """Run every cell of a notebook in a fresh kernel, as Jupyter would (its default inline backend)."""
    monkeypatch.setenv("LORALAB_RESULTS", str(results))
    if experiment:
        monkeypatch.setenv("LORALAB_EXPERIMENT", experiment)
    else:
        monkeypatch.delenv("LORALAB_EXPERIMENT", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel then chooses the inline backend
    nb = jupytext.read(notebook)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    ).execute()
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def check_outputs(cells, plots_shown: bool = True, missing_noted: bool = False):
    """No errors; every plot cell shows an image — or, with `missing_noted`, says which runs it lacks."""
    errors = [o for cell in cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    assert any(cell.get("outputs") for cell in cells)
    if plots_shown:
        for cell in cells:
            if any(call in cell.source for call in ("plots.", "plt.", ".plot(")):
                outputs = cell.get("outputs", [])
                images = [o for o in outputs if "image/png" in o.get("data", {})]
                noted = missing_noted and any(": no " in o.get("text", "") for o in outputs)
                assert images or noted, f"a plot cell shows no image:\n{cell.source[:400]}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_execute_on_the_sweep(sweep, notebook, monkeypatch):
    check_outputs(execute(notebook, monkeypatch, sweep.results))
    # an experiment with one LoRA run: every other item is missing, noted rather than failed
    check_outputs(execute(notebook, monkeypatch, sweep.results, OTHER), plots_shown=False)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_execute_on_the_committed_results(notebook, monkeypatch):
    if not (ROOT / "results").is_dir() or runs_frame(ROOT / "results").empty:
        pytest.skip("no committed results in this checkout")
    # the committed results need not hold every variant (no LoRA-GA runs at present): a cell names what it lacks
    check_outputs(execute(notebook, monkeypatch, ROOT / "results"))


def test_one_notebook_per_paper():
    assert [p.stem for p in NOTEBOOKS] == ["01_lora", "02_loraga", "03_liera"]
    for notebook in NOTEBOOKS:
        assert "matplotlib.use(" not in notebook.read_text()  # the inline backend shows the plots
