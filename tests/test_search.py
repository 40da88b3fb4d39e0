"""Hyperparameter search: `python run.py` returns its `objective`, so Hydra's Optuna sweeper can drive it."""

import re

import pytest
import yaml

from conftest import TINY_TEXT, run_cli

pytestmark = pytest.mark.slow


def optuna_search(tmp_path, *overrides: str):
    """A maximising Optuna search of val/accuracy on the tiny text job, results and sweep under tmp_path."""
    return run_cli(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.direction=maximize",
        *overrides,
        "objective=val/accuracy",
        *TINY_TEXT,
        "logger=none",
        f"paths.results_dir={tmp_path}/results",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )


def test_a_three_trial_optuna_lr_search_on_a_tiny_model(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e .[search]")
    proc = optuna_search(
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=0",
        "train.lr=tag(log, interval(1e-4, 1e-2))",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and 1e-4 <= best["best_params"]["train.lr"] <= 1e-2
    assert 0 <= best["best_value"] <= 1  # a real validation accuracy, not NaN
    assert "3 jobs, 0 failed" in proc.stdout
    lrs = {
        float(m)
        for m in re.findall(
            r"train\.lr=([0-9.e-]+)",
            " ".join(p.read_text() for p in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml")),
        )
    }
    assert len(lrs) == 3 and len(list((tmp_path / "results").rglob("result.json"))) == 3  # three distinct runs


def test_a_refused_trial_is_the_worst_value_and_the_study_goes_on(tmp_path):
    """Optuna's sweeper stops a study at the first trial that returns NaN or no float: a trial whose settings are
    refused returns -inf when maximising, so the other trial still runs and is the best."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e .[search]")
    proc = optuna_search(
        tmp_path, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2", "train.warmup_steps=choice(-1, 0)"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not run: ConfigError: train.warmup_steps=-1 must be >= 0" in proc.stdout
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_params"]["train.warmup_steps"] == 0 and 0 <= best["best_value"] <= 1
    assert len(list((tmp_path / "results").rglob("result.json"))) == 1  # the refused trial wrote nothing


def test_an_objective_the_run_does_not_report_is_one_line_naming_what_it_reports(tmp_path):
    proc = run_cli(*TINY_TEXT, "logger=none", "objective=val/acuracy", f"paths.results_dir={tmp_path}/r", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]  # after the job's own output (it ran: the metrics come from it)
    assert (
        "Traceback" not in proc.stderr
        and line.startswith("loralab: error: objective='val/acuracy': the run reports [")
        and "'val/accuracy'" in line
    )
