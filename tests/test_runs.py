"""End-to-end jobs: real training, result files, skip-on-rerun, failure recording, W&B read-back, sweeps."""

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import QUICK, TINY_TEXT, run_cli
from loralab.record import Status, identity_of, read_record
from loralab.results import load_runs
from loralab.runner import run_job
from loralab.trackers import read_offline_run

pytestmark = pytest.mark.slow


def result_files(root: Path) -> list[Path]:
    return sorted(Path(root).rglob("result.json"))


def test_default_run_quick_mode_on_real_model_and_data(tmp_path):
    """`python run.py` as a newcomer runs it (real MiniLM + tweets), shortened to a few steps."""
    proc = run_cli(*QUICK, "train.max_steps=6", f"paths.results_dir={tmp_path}/results", "logger=none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in (
        "model : minilm",
        "task : tweet_sentiment",
        "variant : lora",
        "rank : 8",
        "trainable /",
        "test/accuracy :",
        "wall time :",
        "peak memory :",
        "result :",
    ):
        assert line in proc.stdout, line
    (path,) = result_files(tmp_path / "results")
    assert json.loads(path.read_text())["schema_version"] == 2
    record = read_record(path)
    key, relative = record.identity.key, path.parent.relative_to(tmp_path / "results")
    assert relative.parts == (
        "default",
        "minilm",
        "tweet_sentiment",
        "lora",
        "qv",  # the model's default target modules are its named set qv
        "r8",
        f"seed0-{key}",
    )
    assert re.fullmatch(r"[0-9a-f]{8}", key) and record.run_dir == relative.as_posix()
    # what the shortened run changed, as resolved values (train.progress / logger / paths: outside the identity)
    assert record.identity.hparams == {
        "train.batch_size": 8,
        "train.eval_batch_size": 64,
        "train.eval_every": 2,
        "train.max_steps": 6,
    }
    assert {"task.n_val": 40, "task.n_test": 60}.items() <= record.identity.setup.items()
    assert record.status == Status.COMPLETED and record.steps == 6
    assert record.params["total"] > 22_000_000 and 0 < record.params["trainable_percent"] < 1
    assert 0 <= record.metrics["test/accuracy"] <= 1 and len(record.curves["train/loss"]) == 6
    assert record.config["model"]["name"] == "minilm" and record.config["train"]["lr"] == 5e-4
    assert len(record.data["fingerprint"]) == 64 and record.data["sizes"]["test"] == 60
    prov = record.provenance
    assert prov["packages"]["peft"] and prov["packages"]["torch"] and "git_dirty" in prov
    assert record.wall_time_s > 0 and record.memory["peak_rss_mb"] > 100
    weights = load_file(str(tmp_path / "results" / record.artifacts["weights"] / "adapter_model.safetensors"))
    assert sum("lora_A" in k for k in weights) == 12  # 6 layers x {query, value}


def test_skip_on_rerun_and_overwrite(compose_cfg):
    cfg = compose_cfg(*TINY_TEXT, "logger=none")
    first = run_job(cfg)
    assert first.status == Status.COMPLETED and not first.skipped
    second = run_job(cfg)
    assert second.skipped and second.started_at == first.started_at and second.run_dir == first.run_dir
    third = run_job(compose_cfg(*TINY_TEXT, "logger=none", "overwrite=true"))
    assert not third.skipped and third.run_dir == first.run_dir  # overwrite=true: the same run, re-run
    assert third.metrics == first.metrics  # same seed -> same numbers


def test_non_finite_loss_fails_the_job_with_its_step(compose_cfg):
    cfg = compose_cfg(*TINY_TEXT, "logger=none", "train.lr=1e30", "train.max_grad_norm=0")
    with pytest.raises(RuntimeError, match="non-finite training loss"):
        run_job(cfg)
    (path,) = result_files(cfg.paths.results_dir)
    assert json.loads(path.read_text())["status"] == "failed"
    record = read_record(path)
    assert record.status == Status.FAILED and record.error["type"] == "NonFiniteLossError"
    assert record.error["step"] == 2 and "at optimizer step 2" in record.error["message"]
    assert path.parent == Path(cfg.paths.results_dir) / identity_of(cfg).relative_dir()


def test_wandb_offline_run_reads_back(compose_cfg, tmp_path):
    record = run_job(compose_cfg(*TINY_TEXT, "experiment_name=wb"), overrides=["rank=8"], group="wb/sweep1")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert Path(record.wandb_dir) == run_dir
    assert run["group"] == "wb/sweep1" and run["name"] == "rank=8"
    assert set(run["tags"]) == {"model:tiny_bert", "task:tweet_sentiment", "variant:lora", "rank:8", "seed:0"}
    assert run["config"]["model"]["name"] == "tiny_bert" and run["config"]["rank"] == 8
    logged = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    assert logged and logged[-1] == pytest.approx(record.curves["train/loss"][-1][1])
    assert run["summary"]["test/accuracy"] == pytest.approx(record.metrics["test/accuracy"])
    assert run["exit_code"] == 0
    logged = {k: v for row in run["history"] for k, v in row.items()}
    assert logged["analysis/spectrum"]["_type"] == logged["analysis/amplification"]["_type"] == "table-file"
    assert logged["analysis/spectrum"]["nrows"] == 4  # 2 layers x {query, value}
    assert logged["analysis/spectrum_figure"]["_type"] == "image-file"  # the spectrum's figure, beside its table
    assert record.analysis["spectrum"] and record.analysis["amplification"]


def test_sweep_writes_results_and_wandb_runs_then_skips(tmp_path):
    args = [
        "-m",
        "variant=lora,full",
        "rank=1,8",
        *TINY_TEXT,
        f"paths.results_dir={tmp_path}/results",
        f"logger.dir={tmp_path}",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
    ]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = result_files(tmp_path / "results")
    assert len(files) == 4 and all(read_record(f).status == Status.COMPLETED for f in files)
    runs = [read_offline_run(d) for d in (tmp_path / "wandb").glob("offline-run-*")]
    (analysis,) = [r for r in runs if r["name"] == "sweep analysis"]  # the sweep's cross-run results, in its group
    runs = [r for r in runs if r is not analysis]
    assert analysis["group"] == runs[0]["group"]
    assert len(runs) == 4
    assert {r["name"].split(",task.")[0] for r in runs} == {"model=tiny_bert,rank=1", "model=tiny_bert,rank=8"}
    assert {(r["config"]["variant"]["name"], r["config"]["rank"]) for r in runs} == {
        ("lora", 1),
        ("lora", 8),
        ("full", 1),
        ("full", 8),
    }
    assert all(f"variant={r['config']['variant']['name']}" in r["name"] for r in runs)
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"].startswith("default/")
    assert "4 jobs, 0 failed" in proc.stdout and (tmp_path / "sweep" / "summary.csv").exists()
    frame = load_runs(tmp_path / "results")
    assert sorted(zip(frame.variant, frame["rank"])) == [("full", 1), ("full", 8), ("lora", 1), ("lora", 8)]
    full, lora = frame[frame.variant == "full"].iloc[0], frame[frame.variant == "lora"].iloc[0]
    assert full["params/trainable"] == full["params/total"] > lora["params/trainable"]

    again = run_cli(*args, "hydra.sweep.dir=" + str(tmp_path / "sweep2"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("[loralab] skip:") == 4
    names = [read_offline_run(d)["name"] for d in (tmp_path / "wandb").glob("offline-run-*")]
    assert len(names) == 6 and names.count("sweep analysis") == 2  # no new job runs; each sweep's analysis run


def test_failing_job_inside_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path):
    """A job that fails after validation (here: a diverging loss) writes a failed record; the next job runs.
    (Bad input is refused before anything is written: tests/test_record.py.)"""
    args = [
        "-m",
        "train.lr=5e-4,1e30",
        "train.max_grad_norm=0",
        *TINY_TEXT,
        "logger=none",
        f"paths.results_dir={tmp_path}/results",
    ]
    proc = run_cli(*args, "hydra.sweep.dir=" + str(tmp_path / "sweep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = load_runs(tmp_path / "results").set_index("lr")
    assert frame.loc[5e-4, "status"] == "completed" and frame.loc[1e30, "status"] == "failed"
    assert "non-finite training loss" in frame.loc[1e30, "error"]
    assert frame.loc[1e30, "record"].error["type"] == "NonFiniteLossError"
    assert "2 jobs, 1 failed" in proc.stdout
    # a re-run retries the failed job (its result is not a completed one) and skips the completed one
    again = run_cli(*args, "hydra.sweep.dir=" + str(tmp_path / "sweep2"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("[loralab] skip:") == 1 and "2 jobs, 1 failed" in again.stdout
    assert len(result_files(tmp_path / "results")) == 2  # the retry replaced the failed record in its place


def test_single_failing_run_exits_nonzero_with_the_message(tmp_path):
    proc = run_cli("rank=0", "logger=none", f"paths.results_dir={tmp_path}/results", cwd=tmp_path)
    assert proc.returncode != 0 and "rank=0 must be a positive integer" in proc.stderr
    assert not (tmp_path / "results").exists()  # bad input: refused before anything is written


def test_digits_transfer_adapts_conv_kernels(compose_cfg):
    cfg = compose_cfg(
        "experiment=digits_transfer", "logger=none", "train.max_steps=30", "train.eval_every=0", "train.progress=false"
    )
    record = run_job(cfg)
    assert record.status == Status.COMPLETED
    assert any(name.endswith("downsampling_layer.1") for name in record.adapted_layers)
    conv_delta = [v for k, v in record.delta_fro_norms.items() if k.endswith("downsampling_layer.1")]
    assert conv_delta and conv_delta[0] > 0
    assert record.metrics["test/accuracy"] > 0.5  # 5 classes: chance is 0.2


def test_analyses_do_not_change_the_run(compose_cfg, tmp_path):
    """analyses=[] is outside the identity (the same run directory) because the analyses fork the RNG."""
    with_analysis = run_job(compose_cfg(*TINY_TEXT, "logger=none", "variant=loraga", "rank=4"))
    without = run_job(
        compose_cfg(
            *TINY_TEXT,
            "logger=none",
            "variant=loraga",
            "rank=4",
            "analyses=[]",
            f"paths.results_dir={tmp_path}/other",
        )
    )
    assert not without.skipped and without.identity == with_analysis.identity
    assert without.run_dir == with_analysis.run_dir
    assert set(with_analysis.analysis) == {"spectrum", "amplification", "first_step"} and without.analysis == {}
    assert "bases" in with_analysis.artifacts and "bases" not in without.artifacts
    assert without.metrics == with_analysis.metrics
    assert without.curves["train/loss"] == with_analysis.curves["train/loss"]
