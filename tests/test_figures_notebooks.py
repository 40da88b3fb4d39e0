"""`make figures` and the notebooks on results: a tiny reproduction sweep written here, then the committed ones."""

import os
import shutil
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

from conftest import ROOT, run_cli
from loralab.figures import render

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
SMALL = [
    "model=tiny_bert",
    "task.n_train=64",
    "task.n_val=40",
    "task.n_test=60",
    "train.max_steps=8",
    "train.batch_size=8",
    "logger=none",
    "train.progress=false",
    "hydra.callbacks.sweep_summary.rank_pairs=[[8,32]]",
    "hydra.callbacks.sweep_summary.seed_pair_rank=32",
]


@pytest.fixture(scope="module")
def tiny_reproduction(tmp_path_factory):
    """The three cpu_repro sweeps on a tiny model (ranks scaled to its 32-dim matrices)."""
    root = tmp_path_factory.mktemp("repro")
    shutil.copytree(ROOT / "results" / "reference", root / "results" / "reference")
    common = [*SMALL, f"paths.results_dir={root}/results"]
    for i, sweep in enumerate(
        (["rank=1,4,8,32"], ["rank=32", "seed=1,2", "targets=qv"], ["variant=loraga,lierra", "rank=4,8", "targets=qv"])
    ):
        proc = run_cli("-m", "experiment=cpu_repro", *sweep, *common, f"hydra.sweep.dir={root}/sweep{i}", cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "results"


def test_figures_render_from_results_alone(tiny_reproduction, tmp_path):
    index = render(tiny_reproduction, "cpu_repro", tmp_path / "figures")
    made = {p.name for p in (tmp_path / "figures").iterdir()}
    for name in (
        "table6_rank",
        "fig3_subspace_ranks",
        "fig4_subspace_seeds",
        "table7_amplification",
        "liera_vs_lora",
        "dw_spectra",
    ):
        assert {f"{name}.md", f"{name}.csv", f"{name}.tex"} <= made, name
    for png in ("table6_rank", "fig3_subspace_ranks", "fig4_subspace_seeds", "loraga_loss_curves", "dw_spectra"):
        assert f"{png}.png" in made and (tmp_path / "figures" / f"{png}.png").stat().st_size > 10_000
    text = index.read_text()
    assert "Paper: LoRA (Hu et al. 2021" in text and text.count("![") == 5
    table6 = (tmp_path / "figures" / "table6_rank.md").read_text()
    assert "Wq,Wv" in table6 and "MultiNLI" in table6  # ours beside the paper's rows


def execute(notebook: Path, results: Path):
    nb = jupytext.read(notebook)
    os.environ["LORALAB_RESULTS"] = str(results)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
        ).execute()
    finally:
        os.environ.pop("LORALAB_RESULTS")
    return nb


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_execute_on_results(tiny_reproduction, notebook):
    nb = execute(notebook, tiny_reproduction)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.output_type == "error"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_execute_on_the_committed_results(notebook):
    if not (ROOT / "results" / "cpu_repro").exists():
        pytest.skip("no committed cpu_repro results in this checkout")
    execute(notebook, ROOT / "results")
