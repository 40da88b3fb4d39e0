"""The run record (loralab.record): the identity computed from the resolved config, the run directory it names, the
result file's round trip, reading schema-1 files, and what a job leaves behind (nothing, for bad input)."""

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import ROOT, TINY_TEXT, run_cli
from loralab.analysis.per_run import ANALYSES
from loralab.config import DEFAULT_ANALYSES, ConfigError
from loralab.gradients import estimate_gradients
from loralab.io import write_json_atomic
from loralab.models import build_model, build_tokenizer
from loralab.record import (
    READABLE,
    RESULT_FILE,
    SCHEMA_VERSION,
    RunRecord,
    Status,
    find_records,
    identity_of,
    migrate,
    read_record,
)
from loralab.results import load_runs
from loralab.runner import check_inputs, run_job
from loralab.tasks import load_task
from loralab.train import device_batches

TINY = ("model=tiny_bert",)
V1_FILE = "results/cpu_repro/minilm/tweet_sentiment/lora/r8/seed0/targets=qv/result.json"


def identity(compose_cfg, *overrides):
    return identity_of(compose_cfg(*TINY, *overrides))


# --- identity ----------------------------------------------------------------------------------------------------


def test_one_value_written_two_ways_is_one_run(compose_cfg):
    a, b = identity(compose_cfg, "train.lr=1e-3"), identity(compose_cfg, "train.lr=0.001")
    assert a == b and a.relative_dir() == b.relative_dir()
    assert a.hparams == {"train.lr": 1e-3}  # the resolved value, not the text typed


@pytest.mark.parametrize(
    "override",
    [
        "train.log_every=5",
        "train.progress=false",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=5",
        "train.resume=false",
        "train.device=cpu",
        "logger=none",
        "save_weights=false",
        "overwrite=true",
        "analyses=[]",
        "analyses=[spectrum]",
        "paths.cache_dir=/elsewhere/cache",
        "paths.results_dir=/elsewhere/results",
        "task.data_dir=/a/local/copy",
    ],
)
def test_settings_outside_the_identity_reuse_the_run(compose_cfg, override):
    base, other = identity(compose_cfg), identity(compose_cfg, override)
    assert other == base and other.relative_dir() == base.relative_dir()


@pytest.mark.parametrize(
    "override, section, key, value",
    [
        ("train.lr=2e-3", "hparams", "train.lr", 2e-3),
        ("variant.alpha=32", "hparams", "variant.alpha", 32.0),
        ("train.eval_every=0", "hparams", "train.eval_every", 0),
        ("task.n_train=10", "setup", "task.n_train", 10),
    ],
)
def test_settings_that_change_the_computation_change_the_key(compose_cfg, override, section, key, value):
    base, other = identity(compose_cfg), identity(compose_cfg, override)
    assert other != base and other.key != base.key and other.relative_dir() != base.relative_dir()
    assert getattr(other, section) == getattr(base, section) | {key: value}
    assert all(getattr(other, k) == getattr(base, k) for k in READABLE)  # only the key names the difference


@pytest.mark.parametrize(
    "override, part, value", [("rank=4", "rank", 4), ("seed=1", "seed", 1), ("targets=qkvo", "targets", "qkvo")]
)
def test_readable_parts_change_the_directory_not_the_key(compose_cfg, override, part, value):
    base, other = identity(compose_cfg), identity(compose_cfg, override)
    assert other != base and getattr(other, part) == value
    assert other.key == base.key and other.hparams == base.hparams and other.setup == base.setup
    changed = [a for a, b in zip(other.relative_dir().parts, base.relative_dir().parts) if a != b]
    assert len(changed) == 1 and str(value) in changed[0]


def test_run_directory_layout(compose_cfg):
    ident = identity(compose_cfg, "rank=4", "seed=2", "experiment_name=exp")
    assert re.fullmatch(r"[0-9a-f]{8}", ident.key)
    assert ident.relative_dir().parts == (
        "exp",
        "tiny_bert",
        "tweet_sentiment",
        "lora",
        "qv",
        "r4",
        f"seed2-{ident.key}",
    )
    assert ident.columns() == {
        "experiment": "exp",
        "model": "tiny_bert",
        "task": "tweet_sentiment",
        "variant": "lora",
        "targets": "qv",
        "rank": 4,
        "seed": 2,
        "key": ident.key,
    }


def test_the_variants_own_learning_rate_is_a_hyperparameter(compose_cfg):
    full = identity(compose_cfg, "variant=full")
    assert full.hparams == {"train.lr": 5e-5} and full.variant == "full"  # variant.lr itself: outside the identity
    assert identity(compose_cfg, "variant=full", "train.lr=5e-5") == full
    assert identity(compose_cfg).hparams == {}  # LoRA's 5e-4 is the schema default


def test_the_effective_target_set_is_the_identity(compose_cfg):
    default = identity(compose_cfg)
    assert default.targets == "qv" and identity(compose_cfg, "targets=qv") == default  # tiny_bert's default is qv
    assert identity(compose_cfg, "model.target_modules=[query]") == identity(compose_cfg, "targets=q")
    unnamed = identity(compose_cfg, "model.target_modules=[query,key]")
    assert unnamed.targets == "query+key" and unnamed.key == default.key


def test_identity_of_a_stored_config_equals_that_of_the_composed_one(compose_cfg):
    cfg = compose_cfg(*TINY_TEXT, "variant=loraga", "rank=4")
    stored = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))  # as a result file holds it
    assert identity_of(stored) == identity_of(cfg)


# --- reading schema-1 files ------------------------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def committed_v1_record() -> dict:
    """A real schema-1 result file: `V1_FILE` as first committed (the committed results have since been migrated
    to the current schema, so it is read from the repository's history, not from the working tree)."""
    try:
        first = git("log", "--reverse", "--format=%H", "--", V1_FILE).split()
        raw = json.loads(git("show", f"{first[0]}:{V1_FILE}")) if first else None
    except (OSError, subprocess.CalledProcessError):
        raw = None
    if raw is None:
        pytest.skip(f"{V1_FILE} is not in this checkout's git history (shallow clone?)")
    assert "schema_version" not in raw  # a schema-1 file
    return raw


def test_schema_1_results_are_read_with_their_identity(tmp_path):
    raw = committed_v1_record()
    old_place = Path(V1_FILE).parent.relative_to("results")
    write_json_atomic(tmp_path / old_place / RESULT_FILE, raw)
    tuned = json.loads(json.dumps(raw))
    tuned["config"]["train"]["lr"] = 0.002
    tuned["weights_dir"] = "/somewhere/it/was/weights"
    write_json_atomic(tmp_path / f"{old_place},train.lr=0.002" / RESULT_FILE, tuned)

    frame = load_runs(tmp_path).sort_values("lr").reset_index(drop=True)
    assert len(frame) == 2
    for _, row in frame.iterrows():
        assert (row.experiment, row.model, row.task, row.variant, row.targets) == (
            "cpu_repro",
            "minilm",
            "tweet_sentiment",
            "lora",
            "qv",
        )
        assert (row["rank"], row.seed, row["train.eval_every"], row.status) == (8, 0, 0, "completed")
    plain, lr = frame.record
    assert plain.schema_version == lr.schema_version == SCHEMA_VERSION
    assert plain.run_dir == old_place.as_posix() and plain.artifacts == {}  # where the file is, relative to the root
    assert plain.config["analyses"] == list(DEFAULT_ANALYSES) and "analyze" not in plain.config
    assert plain.metrics == raw["metrics"] and plain.curves == raw["curves"]
    assert "train.lr" not in plain.identity.hparams and pd.isna(frame.loc[0, "train.lr"])
    assert frame.loc[1, "train.lr"] == 0.002 and lr.identity.hparams["train.lr"] == 0.002
    assert lr.identity.key != plain.identity.key
    assert lr.artifacts == {"weights": f"{old_place},train.lr=0.002/weights"}  # relative to the root now
    assert load_runs(tmp_path, **{"train.lr": 0.002}).run_dir.tolist() == [lr.run_dir]


def test_unknown_schemas_and_broken_files(tmp_path):
    with pytest.raises(ValueError, match="unknown result schema_version 99"):
        migrate({"schema_version": 99}, "x")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / RESULT_FILE).write_text("{not json")
    assert read_record(tmp_path / "a" / RESULT_FILE) is None and read_record(tmp_path / "none.json") is None
    assert find_records(tmp_path) == [] and load_runs(tmp_path).empty
    record = RunRecord.from_dict(migrate(committed_v1_record(), "v1"))
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        RunRecord.from_dict(record.to_dict() | {"bogus": 1})


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("rank=0", "rank=0 must be a positive integer"),
        ("rank=999", "rank=999 exceeds the largest rank 32"),
        ("analyses=[bogus]", "analyses=['bogus']: each at most once, from " + str(sorted(ANALYSES))),
        ("analyses=[spectrum,spectrum]", "each at most once"),
        ("targets=nope", "targets='nope' is not a target set of model 'tiny_bert'"),
        ("model.head_modules=[clasifier]", r"head_modules ['clasifier'] do not exist"),
    ],
)
def test_bad_input_leaves_nothing_behind(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg(*TINY_TEXT, override)
    with pytest.raises(ConfigError) as err:
        run_job(cfg)
    assert message in str(err.value)
    assert list(tmp_path.rglob("*")) == []  # no result, run directory, W&B run or cache
    if override.startswith("analyses"):
        assert all(name in str(err.value) for name in ANALYSES)  # the message lists what is allowed


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_rerun_written_differently_or_logged_differently_is_skipped(compose_cfg):
    first = run_job(compose_cfg(*TINY_TEXT, "logger=none", "train.lr=1e-3"))
    assert first.status == Status.COMPLETED and not first.skipped
    for override in ("train.lr=0.001", "train.log_every=5"):
        again = run_job(compose_cfg(*TINY_TEXT, "logger=none", "train.lr=1e-3", override))
        assert again.skipped and again.run_dir == first.run_dir and again.started_at == first.started_at
        assert again.metrics == first.metrics
    other = run_job(compose_cfg(*TINY_TEXT, "logger=none", "train.lr=2e-3"))
    assert not other.skipped and other.run_dir != first.run_dir and other.identity.key != first.identity.key


@pytest.mark.slow
def test_record_round_trip_and_artifacts(compose_cfg):
    cfg = compose_cfg(*TINY_TEXT, "logger=none")
    record = run_job(cfg)
    root = Path(cfg.paths.results_dir)
    assert record.status == Status.COMPLETED and RunRecord.from_dict(record.to_dict()) == record
    path = root / record.run_dir / RESULT_FILE
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == 2 and raw["status"] == "completed" and "skipped" not in raw
    assert raw["identity"]["key"] == record.identity.key and raw["run_dir"] == record.run_dir
    assert not Path(record.run_dir).is_absolute() and record.run_dir == record.identity.relative_dir().as_posix()
    assert RunRecord.from_dict(raw).to_dict() == json.loads(json.dumps(record.to_dict()))
    assert set(record.artifacts) == {"weights", "bases"}
    for name, relative in record.artifacts.items():
        assert not Path(relative).is_absolute() and (root / relative).exists(), name
    assert (root / record.artifacts["weights"] / "adapter_model.safetensors").is_file()
    (row,) = load_runs(root).to_dict("records")
    assert row["record"].identity == record.identity and row["test/accuracy"] == record.metrics["test/accuracy"]


@pytest.mark.slow
def test_first_step_probe_leaves_the_loraga_gradient_cache_and_the_run_as_they_are(compose_cfg, tmp_path):
    """The first-step probe measures LoRA-GA's real init (no second `prepare`), so the gradient cache a run writes is
    the variant's own estimate, with or without the probe, and training is the same."""
    common = [*TINY_TEXT, "logger=none", "variant=loraga", "rank=4"]
    cfg_a = compose_cfg(*common, f"variant.grad_cache={tmp_path}/a.safetensors")
    assert "first_step" in cfg_a.analyses
    probed = run_job(cfg_a)
    # the same run (neither the analyses nor the cache's place are part of its identity): re-run it
    cfg_b = compose_cfg(*common, "analyses=[]", f"variant.grad_cache={tmp_path}/b.safetensors", "overwrite=true")
    assert identity_of(cfg_b) == identity_of(cfg_a)
    plain = run_job(cfg_b)
    assert probed.status == plain.status == Status.COMPLETED
    assert probed.analysis["first_step"] and plain.analysis == {} and "bases" not in plain.artifacts
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() == set(probed.adapted_layers) and len(a) == 4
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the estimate itself, made as the job's build and prepare stages make it: seed, data, model, the variant's batches
    _, targets = check_inputs(cfg_b)
    set_seed(cfg_b.seed)
    data = load_task(cfg_b.task, build_tokenizer(cfg_b.model))
    model = build_model(cfg_b.model, cfg_b.task, cfg_b.paths.cache_dir)
    batches = device_batches(data, cfg_b.variant.grad_batch_size, None, "cpu")  # file order: grad_sample=first
    expected = estimate_gradients(model, targets, batches, cfg_b.variant.grad_batches)
    assert expected.keys() == a.keys() and all(torch.equal(expected[k], a[k]) for k in a)

    assert plain.metrics == probed.metrics and plain.curves == probed.curves
    assert plain.delta_fro_norms == probed.delta_fro_norms


@pytest.mark.slow
def test_a_bad_job_in_a_sweep_is_listed_and_the_sweep_goes_on(tmp_path):
    proc = run_cli(
        "-m",
        "rank=4,999",
        *TINY_TEXT,
        "logger=none",
        f"paths.results_dir={tmp_path}/results",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[loralab] job 1 not run: ConfigError: rank=999 exceeds the largest rank 32" in proc.stdout
    assert "2 jobs, 1 failed" in proc.stdout
    (path,) = (tmp_path / "results").rglob(RESULT_FILE)  # the bad job wrote nothing
    record = read_record(path)
    assert record.status == Status.COMPLETED and record.identity.rank == 4
    assert "rank=999 exceeds" in (tmp_path / "sweep" / "1" / "config_error.txt").read_text()
    assert not (tmp_path / "sweep" / "1" / "result_path.txt").exists()
    rows = (tmp_path / "sweep" / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and sum(",completed," in r for r in rows) == 1 and sum(",failed," in r for r in rows) == 1
