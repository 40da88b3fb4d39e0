"""What a researcher reads in W&B, read back from offline runs; bad input at the command line."""

import time
from pathlib import Path

import pytest

from conftest import TINY_TEXT, run_cli
from loralab.config import ConfigError, validate
from loralab.record import RESULT_FILE, Status
from loralab.reporting import wandb_run_id
from loralab.runner import run_job
from loralab.trackers import read_offline_run

pytestmark = pytest.mark.slow


def offline_runs(root: Path, wait_s: float = 20.0) -> list[dict]:
    """Every offline run under root, once each has its final `exit` record: W&B's service process writes the
    transaction log asynchronously, so the last records (summary, exit) can land just after `run.finish()`."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = [read_offline_run(d) for d in sorted((root / "wandb").glob("offline-run-*"))]
        if all("exit_code" in run for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def test_offline_run_has_system_metrics_console_summary_provenance_and_one_step_axis(compose_cfg, tmp_path):
    record = run_job(compose_cfg(*TINY_TEXT, "train.log_every=2", "experiment_name=wb"))
    (run,) = offline_runs(tmp_path)
    assert run["id"] == record.wandb_run_id and run["id"].startswith(wandb_run_id(record.identity))
    assert run["stats"] and any("proc.memory.rssMB" in s for s in run["stats"])  # the System tab
    assert any(f"[loralab] run {tmp_path}" in line for line in run["console"])  # the Logs tab
    summary = run["summary"]
    assert summary["status"] == "completed" and summary["steps"] == record.steps == 4
    assert summary["params/trainable"] == record.params["trainable"] and summary["examples_per_s"] > 0
    assert 4 * 8 <= record.tokens <= 4 * 8 * 64  # 4 steps of 8 examples, 1..max_length=64 tokens each
    assert summary["tokens_per_s"] == pytest.approx(record.tokens / record.train_time_s, rel=1e-3)
    assert summary["train_time_s"] == record.train_time_s and summary["init_time_s"] == record.init_time_s
    assert summary["test/accuracy"] == pytest.approx(record.metrics["test/accuracy"])
    assert "metrics" not in summary  # the metrics once, not also as a nested copy
    config = run["config"]
    assert config["provenance"]["git_sha"] == record.provenance["git_sha"]
    assert config["provenance"]["packages"]["peft"] and config["identity"]["key"] == record.identity.key
    rows = [r for r in run["history"] if set(r) - {"_step", "_runtime", "_timestamp"}]
    assert rows and all(r["step"] == r["_step"] for r in rows)  # one step axis for every key
    norms = [r["train/grad_norm"] for r in rows if "train/grad_norm" in r]
    assert len(norms) == 2 and all(n > 0 for n in norms)  # steps 2 and 4
    tables = [r for r in rows if "analysis/spectrum" in r]
    assert tables and all(r["step"] == record.steps for r in tables)  # the analyses at the final step


def test_a_run_trains_the_same_with_and_without_wandb(compose_cfg, tmp_path):
    """W&B starts after the data and the model are built, just before the init: it must not shift a random stream."""
    quiet = run_job(compose_cfg(*TINY_TEXT, "logger=none", f"paths.results_dir={tmp_path}/a", "variant.dropout=0.1"))
    tracked = run_job(compose_cfg(*TINY_TEXT, "logger.system_metrics=false", "variant.dropout=0.1"))
    assert tracked.wandb_dir and not quiet.wandb_dir
    assert tracked.curves == quiet.curves and tracked.metrics == quiet.metrics


def test_step_analyses_reach_wandb_at_their_steps(compose_cfg, tmp_path):
    record = run_job(compose_cfg(*TINY_TEXT, "analysis_steps=[2]", "logger.system_metrics=false"))
    (run,) = offline_runs(tmp_path)
    steps = [r["step"] for r in run["history"] if "analysis/amplification" in r]
    assert steps == [2, record.steps]  # the table at step 2 during training, then the final one
    assert not [r for r in run["history"] if "analysis/first_step" in r and r["step"] == 2]  # the init only


def test_a_failed_job_has_its_error_in_the_summary(compose_cfg, tmp_path):
    with pytest.raises(RuntimeError, match="non-finite"):
        run_job(compose_cfg(*TINY_TEXT, "train.lr=1e30", "train.max_grad_norm=0"))
    (run,) = offline_runs(tmp_path)
    assert run["summary"]["status"] == "failed" and run["exit_code"] == 1
    assert run["summary"]["error/type"] == "NonFiniteLossError" and run["summary"]["error/step"] == 2
    assert "non-finite training loss" in run["summary"]["error/message"]


def test_a_fresh_start_opens_a_new_wandb_run_and_a_resumed_job_continues_its_own(compose_cfg, tmp_path):
    """W&B drops every step below a run's current one, so a restart from step 0 (overwrite=true) gets a new run id;
    a job resumed from a checkpoint (one killed after it: here its result removed) continues the run it names."""
    args = (
        *TINY_TEXT,
        "logger.system_metrics=false",
        "train.checkpoint_every=2",
        "analyses=[]",
        "train.max_grad_norm=0",
    )
    first = run_job(compose_cfg(*args))
    second = run_job(compose_cfg(*args, "overwrite=true"))
    (tmp_path / "results" / second.run_dir / RESULT_FILE).unlink()
    third = run_job(compose_cfg(*args))
    assert first.identity == second.identity == third.identity and third.resumed_from_step == 4
    assert first.wandb_run_id != second.wandb_run_id == third.wandb_run_id
    assert first.wandb_run_id.startswith(f"{wandb_run_id(first.identity)}-")
    runs = offline_runs(tmp_path)  # named by start second, then id: two starts in one second sort by their ids
    assert sorted(r["id"] for r in runs) == sorted([first.wandb_run_id, second.wandb_run_id, second.wandb_run_id])
    (first_run,) = [r for r in runs if r["id"] == first.wandb_run_id]
    assert not first_run["stats"] and {first.status, second.status, third.status} == {Status.COMPLETED}
    norms = [r["train/grad_norm"] for r in first_run["history"] if "train/grad_norm" in r]
    assert len(norms) == 1 and norms[0] > 0  # logged at the last step although nothing is clipped


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.eval_every=-5", r"train.eval_every=-5 must be >= 0"),
        ("train.log_every=0", r"train.log_every=0 must be positive"),
        ("train.warmup_steps=-1", r"train.warmup_steps=-1 must be >= 0"),
        ("train.max_grad_norm=-1", r"train.max_grad_norm=-1.0: must be >= 0"),
        ("train.num_workers=-1", r"train.num_workers=-1 must be >= 0"),
        ("+train.lrr=1 +variant.alhpa=2", r"unknown settings \['variant.alhpa', 'train.lrr'\]: no schema declares"),
        ("train.select_best=val-acc", r"select_best='val-acc': none, metric .*, loss, or a validation"),
        ("objective=accuracy", r"objective='accuracy': a metric of the run's record, <val/\|test/\|final/val/"),
        ("variant.dropout=1.0", r"variant.dropout=1.0 must be in \[0, 1\)"),
        ("variant.alpha=0", r"variant.alpha=0.0 must be > 0"),
        ("variant=lora_plus variant.lr_ratio=-2", r"variant.lr_ratio=-2.0 must be > 0"),
        ("variant=adalora variant.init_rank_ratio=0.5", r"variant.init_rank_ratio=0.5 must be >= 1"),
        ("variant=adalora variant.tinit_ratio=0.6 variant.tfinal_ratio=0.5", r"tinit_ratio=0.6 \+ .* must be < 1"),
        ("variant=adalora variant.delta_t=0", r"variant.delta_t=0 must be >= 1"),
        ("variant=dora_lierra variant.dropout=0.1", r"dora_lierra: variant.dropout=0.1 is not supported"),
        ("task.max_length=0", r"task.max_length=0 must be > 0"),
        ("task.n_val=-1", r"task.n_val=-1 must be >= 0"),
        ("task.n_train=0", r"task.n_train=0 must be > 0 \(or null"),
        ("task.generation.num_beams=0", r"task.generation.num_beams=0 must be >= 1"),
        ("task.generation.top_p=0", r"task.generation.top_p=0.0 must be in \(0, 1\]"),
        ("task.generation.do_sample=true task.generation.temperature=0", r"generation.temperature=0.0 must be > 0"),
    ],
)
def test_bad_settings_fail_validation(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(*TINY_TEXT, *override.split()))


def test_greedy_decoding_ignores_the_temperature(compose_cfg):
    validate(compose_cfg(*TINY_TEXT, "task.generation.temperature=0"))  # do_sample=false: not checked


def test_bad_input_at_the_command_line_exits_2_with_one_line_and_leaves_nothing(tmp_path):
    proc = run_cli(
        *TINY_TEXT, "logger=none", "train.eval_every=-5", f"paths.results_dir={tmp_path}/results", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == "loralab: error: train.eval_every=-5 must be >= 0"
    assert "Traceback" not in proc.stderr and not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "override, line",
    [
        ("train.scheduler=cosin", "train.scheduler=cosin: Invalid value 'cosin', expected one of [linear, cosine,"),
        ("train.eval_every=abc", "train.eval_every=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ("variant=nope", "variant=nope: no such option; variant: adalora, adalora_static, dora,"),
        ("train.nosuch=1", "unknown setting 'train.nosuch'; train has: lr, lr_table,"),
        ("train.lr=[", "train.lr=[: no viable alternative at input '['"),
    ],
)
def test_a_bad_value_at_composition_exits_2_with_one_line_naming_what_is_allowed(tmp_path, override, line):
    proc = run_cli(*TINY_TEXT, "logger=none", override, f"paths.results_dir={tmp_path}/results", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [text for text in proc.stderr.splitlines() if text.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"loralab: error: {line}"), proc.stderr[-2000:]
    assert not proc.stdout.strip() and not list(tmp_path.iterdir())  # nothing written, not even Hydra's outputs/


def test_the_traceback_of_a_composition_error_on_request(tmp_path):
    proc = run_cli("train.scheduler=cosin", "hydra.verbose=true", cwd=tmp_path)
    assert proc.returncode != 2 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr


def test_run_log_holds_the_stages_and_where_the_run_and_its_wandb_run_are(tmp_path):
    proc = run_cli(
        *TINY_TEXT,
        "logger.system_metrics=false",
        f"logger.dir={tmp_path}",
        f"paths.results_dir={tmp_path}/results",
        f"hydra.run.dir={tmp_path}/hydra",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "hydra" / "run.log").read_text()
    (run_dir,) = [p.parent for p in (tmp_path / "results").rglob("result.json")]
    assert f"[loralab] run {run_dir}\n" in log and f"[loralab] run {run_dir} | W&B {tmp_path}/wandb/" in log
    stages = ["build", "data: ", "model tiny_bert:", "prepare", "first-step probe: full fine-tuning's gradient"]
    stages += ["first-step probe: lora's first step", "first-step probe: done", "train_stage", "analyse", "saving"]
    where = [log.find(stage) for stage in stages]
    assert -1 not in where and where == sorted(where), dict(zip(stages, where))  # every stage, in order


def test_sweep_report_over_seeds_its_analysis_run_and_fail_on_error(tmp_path):
    """A sweep with two seeds and a diverging lr: the table over seeds, one W&B analysis run in the sweep's group
    with the φ table and grid of the seed pair and the claims, and a non-zero exit under fail_on_error."""
    proc = run_cli(
        "-m",
        "seed=0,1",
        "train.lr=5e-4,1e30",
        "train.max_grad_norm=0",
        *TINY_TEXT,
        "logger.system_metrics=false",
        f"logger.dir={tmp_path}",
        f"paths.results_dir={tmp_path}/results",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "hydra.callbacks.sweep_summary.seed_pairs=[[0,1]]",
        "hydra.callbacks.sweep_summary.seed_pair_rank=8",
        "hydra.callbacks.sweep_summary.fail_on_error=true",
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "2 of 4 jobs failed" in proc.stderr + proc.stdout
    assert "4 jobs, 2 failed" in proc.stdout and "over seeds (mean ± std (n))" in proc.stdout
    assert "(n=2)" in proc.stdout.split("over seeds")[1]
    assert "cross-run analysis 1/1: seed pair" in proc.stdout  # a stage line of the sweep's own
    runs = offline_runs(tmp_path)
    assert len(runs) == 5 and len({r["group"] for r in runs}) == 1
    (analysis,) = [r for r in runs if r["name"] == "sweep analysis"]
    keys = {k for row in analysis["history"] for k in row}
    pair = [k for k in keys if k.startswith("subspace/") and k.endswith("r8s0-vs-r8s1")]
    assert pair and f"{pair[0]}_grid" in keys and {"claims", "amplification"} <= keys
    assert analysis["history"][0] and analysis["config"]["sweep_dir"] == str(tmp_path / "sweep")


def test_a_preset_sweep_run_without_multirun_says_so(tmp_path):
    proc = run_cli("experiment=cpu_repro", *TINY_TEXT, "logger=none", f"paths.results_dir={tmp_path}/r", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "defines a sweep (rank=1,2,4,8,64, targets=q,qv,qkvo); add -m to run it" in proc.stdout


def test_the_adapter_is_uploaded_as_a_model_artifact_on_request(compose_cfg, tmp_path):
    record = run_job(compose_cfg(*TINY_TEXT, "logger.system_metrics=false", "logger.log_model=true"))
    (run,) = offline_runs(tmp_path)
    models = [a for a in run["artifacts"] if a["type"] == "model"]  # (analysis tables are run_table artifacts)
    assert models == [{"name": f"weights-{wandb_run_id(record.identity)}", "type": "model"}]
    quiet = run_job(compose_cfg(*TINY_TEXT, "logger.system_metrics=false", "seed=1"))
    assert quiet.status == Status.COMPLETED
    assert not [a for r in offline_runs(tmp_path) for a in r["artifacts"] if a["type"] == "model"][1:]  # off by default
