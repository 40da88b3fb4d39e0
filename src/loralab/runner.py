"""One job in stages: validate -> build -> prepare -> train -> analyse -> record (`run_job` calls them in order).

Bad input stops at validation, before anything is loaded or written; bad input that only the data or the model shows
stops in `build` before the tracker starts, with nothing written either; every later outcome ends in a result file."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import get_int_from_env, set_seed
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from loralab.analysis.per_run import ANALYSES, PerRunAnalysis, make_analyses
from loralab.analysis.updates import matrix_updates
from loralab.config import TASK_KINDS, ConfigError, target_modules, validate
from loralab.host_memory import release_freed_memory
from loralab.io import atomic_dir, atomic_path, write_json_atomic
from loralab.models import build_model, build_skeleton, build_tokenizer
from loralab.record import RESULT_FILE, RunRecord, Status, identity_of, read_record
from loralab.reporting import format_summary, fresh_run_id, override_name, tracker_summary, wandb_run_id
from loralab.results import BASES_FILE, PeakMemory, provenance
from loralab.targets import check_rank, find_targets, matches
from loralab.tasks import check_data_path, load_task
from loralab.trackers import Tracker, make_tracker
from loralab.train import (
    NonFiniteLossError,
    check_gradient_checkpointing,
    check_select_best,
    checkpoint_meta,
    checkpoints,
    device_batches,
    gathered_parameters,
    make_accelerator,
    total_steps,
    train,
)
from loralab.variants import PrepareContext, Variant, get_variant

log = logging.getLogger(__name__)
STEPS_DIR = "steps"  # <run>/steps/step_N.json: the analyses at `analysis_steps`


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / total, 4)}


def head_modules(cfg) -> list[str]:
    """The new task head, trained in every variant; language-model tasks keep the pretrained LM head frozen."""
    return list(cfg.model.head_modules) if TASK_KINDS[cfg.task.kind][1] else []


def check_inputs(cfg):
    """Everything that can be checked without weights or data; returns (variant, target layer names)."""
    validate(cfg)
    check_data_path(cfg.task)
    variant = get_variant(cfg.variant.name)(cfg.variant, cfg.rank)
    skeleton = build_skeleton(cfg.model, cfg.task)  # meta device: no memory, no download of weights
    names = {n for n, _ in skeleton.named_modules()}
    missing_heads = [h for h in head_modules(cfg) if not any(matches(n, h) for n in names)]
    if missing_heads:
        raise ConfigError(
            f"model {cfg.model.name!r}: head_modules {missing_heads} do not exist in {type(skeleton).__name__}"
        )
    targets = find_targets(skeleton, target_modules(cfg), exclude=head_modules(cfg))
    check_rank(skeleton, targets, cfg.rank, variant.max_rank)
    variant.check_targets(dict(skeleton.named_modules()), targets)
    return variant, targets


def is_main_process() -> bool:
    """Rank 0 of a multi-process job (torchrun, `accelerate launch`, mpirun, SLURM tasks), read from the launcher's
    variables so that it is known before accelerate starts and also when a job fails before it does."""
    return get_int_from_env(["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0


@dataclass
class Job:
    """What the stages of one job hand on to each other."""

    cfg: DictConfig
    record: RunRecord
    out: Path  # the run directory
    root: Path  # the results root (record paths are relative to it)
    variant: Variant
    targets: list[str]
    analyses: list[PerRunAnalysis]
    main: bool = field(default_factory=is_main_process)
    group: str | None = None
    accelerator: Any = None
    tracker: Tracker | None = None
    data: Any = None
    model: torch.nn.Module | None = None
    run_id: str | None = None  # the W&B run's (whether or not this job logs to W&B: a relaunch may)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def validate_job(cfg) -> tuple[Variant, list[str], list[PerRunAnalysis]]:
    """Stage 1: everything checkable without weights or data (`ConfigError` naming the bad value)."""
    variant, targets = check_inputs(cfg)
    return variant, targets, make_analyses(list(cfg.analyses), cfg.rank, targets)


def say(message: str, level: int = logging.INFO) -> None:
    """A stage line through `logging` where it is shown (Hydra's console and run.log, SLURM logs); printed where
    logging is not set up (run_job from Python, a notebook)."""
    if log.isEnabledFor(level):
        log.log(level, message)
    else:
        print(message)


@contextmanager
def rng_kept():
    """The random streams as they were: starting W&B after the model is built must not change what the run trains."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


def build(job: Job) -> None:
    """Stage 2: accelerator, data and the pretrained model, then the tracker. What only the data or the model can
    show wrong (a hub out of reach, wrong columns, a missing split) fails before anything is written."""
    cfg, record = job.cfg, job.record
    job.accelerator = make_accelerator(cfg.train)
    record.processes = job.accelerator.num_processes  # data-parallel processes that trained this run
    if job.main:  # where to look, before the minutes of work start
        say(f"[loralab] run {job.out}")
    set_seed(cfg.seed)
    job.data = load_task(cfg.task, build_tokenizer(cfg.model))
    record.data = {"fingerprint": job.data.fingerprint, "sizes": job.data.sizes}
    log.info("data: %s examples (train/val/test)", "/".join(map(str, job.data.sizes.values())))
    job.model = build_model(cfg.model, cfg.task, cfg.paths.cache_dir).to(job.accelerator.device)
    log.info("model %s: %s on %s", cfg.model.name, type(job.model).__name__, job.accelerator.device)
    if cfg.train.gradient_checkpointing:
        check_gradient_checkpointing(job.model)
    check_select_best(cfg.train, job.data, job.model, job.accelerator)
    identity = record.identity
    # a job resumed from a checkpoint continues the W&B run that checkpoint names (written before the notes
    # existed: the identity's id); a fresh start opens a new run (see fresh_run_id)
    latest = checkpoints(job.out / "checkpoints")[-1:] if resumes(cfg) else []
    if latest:
        job.run_id = checkpoint_meta(latest[0]).get("wandb_run_id", wandb_run_id(identity))
    else:
        job.run_id = fresh_run_id(identity, record.started_at)
    with rng_kept():
        job.tracker = make_tracker(
            cfg.logger,
            group=job.group or cfg.experiment_name,
            name=override_name(record.overrides),
            tags=[f"{k}:{getattr(identity, k)}" for k in ("model", "task", "variant", "rank", "seed")],
            # group / filter dashboards by identity; provenance beside the config
            config=record.config | {"identity": identity.columns(), "provenance": record.provenance},
            run_id=job.run_id,
            main_process=job.main,
        )
    record.wandb_dir = job.tracker.location
    record.wandb_run_id = job.run_id if record.wandb_dir else None
    if job.main and record.wandb_dir:  # also the first line of the W&B run's Logs tab
        say(f"[loralab] run {job.out} | W&B {record.wandb_dir}")


def prepare(job: Job) -> None:
    """Stage 3: the variant's init, with the analyses that look at the model just before and just after it."""
    cfg, device = job.cfg, job.accelerator.device
    if job.analyses:
        first_batch = next(device_batches(job.data, cfg.train.batch_size, cfg.seed, device))
        for analysis in job.analyses:
            analysis.before_prepare(job.model, first_batch)
    ctx = PrepareContext(
        train_batches=lambda size: device_batches(job.data, size, cfg.seed, device),
        first_batches=lambda size: device_batches(job.data, size, None, device),
        total_steps=total_steps(cfg.train, len(job.data.train), job.accelerator.num_processes),
    )
    start = time.perf_counter()
    job.model = job.variant.prepare(job.model, job.targets, head_modules(cfg), ctx)
    job.record.init_time_s = round(time.perf_counter() - start, 3)
    for analysis in job.analyses:
        analysis.after_prepare(job.model, job.variant)
    release_freed_memory()  # the init's and the probe's buffers, before the training loop's of other sizes
    job.record.params = count_parameters(job.model)
    job.record.adapted_layers = list(job.targets)


def resumes(cfg) -> bool:
    """Whether a job continues from its newest checkpoint, where it has one (overwrite=true: from scratch)."""
    return cfg.train.resume and not cfg.overwrite


def train_stage(job: Job) -> None:
    """Stage 4: the training loop (and its final evaluation), with the ΔW analyses at `analysis_steps`."""
    cfg = job.cfg
    n_steps = total_steps(cfg.train, len(job.data.train), job.accelerator.num_processes)
    late = [s for s in cfg.analysis_steps if s >= n_steps]
    if late and job.main:  # a preset's steps on a shortened run (train.max_steps=...): the end is analysed anyway
        say(
            f"[loralab] analysis_steps {late} are not below the run's {n_steps} steps: only its end is analysed",
            logging.WARNING,
        )
    resume = resumes(cfg)
    if job.main and not (resume and checkpoints(job.out / "checkpoints")):
        shutil.rmtree(job.out / STEPS_DIR, ignore_errors=True)  # a fresh start: no step analyses of an older run
    result = train(
        job.model,
        job.variant,
        job.data,
        cfg.train,
        cfg.seed,
        job.tracker,
        job.accelerator,
        checkpoint_dir=job.out / "checkpoints",
        eval_dir=job.out / "eval",
        resume=resume,
        checkpoint_layers=job.targets,
        on_step=step_analyses(job, n_steps) if cfg.analysis_steps else None,
        checkpoint_notes={"wandb_run_id": job.run_id},  # the run a resumed job continues
    )
    job.record.metrics, job.record.curves, job.record.steps = result.metrics, result.curves, result.steps
    job.record.train_time_s = round(result.train_time_s, 2)
    job.record.tokens = result.tokens or None
    job.record.resumed_from_step = result.resumed_from


def update_analyses(job: Job, analyses: list[PerRunAnalysis]) -> tuple[dict, dict, dict]:
    """Every adapted matrix's ΔW, one at a time (factors, or formed where full-rank, then dropped), through
    `analyses`. Returns their tables {name: rows}, their tensors, and ‖ΔW‖_F per matrix. Call it on every process
    inside `gathered_parameters` (FSDP); `analyses` may be empty off the main process."""
    model, norms = job.model, {}
    factors = job.variant.factors(model) if analyses else {}  # adapter-sized
    for update in tqdm(matrix_updates(model, job.variant), desc="analyses", total=len(job.targets), disable=None):
        for analysis in analyses:
            analysis.add(update, factors.get(update.name))
        norms[update.name] = update.fro_norm()  # from the analyses' SVD where they took one
        del update
    tables = {analysis.name: rows for analysis in analyses if (rows := analysis.rows())}
    tensors = {key: t for analysis in analyses for key, t in analysis.tensors().items()}
    return tables, tensors, norms


def step_analyses(job: Job, n_steps: int):
    """The callback `train` calls after every optimizer step: at each of `analysis_steps`, the analyses of ΔW on the
    model as it is then, written to `<run>/steps/step_N.json` (+ its bases) and to W&B at that step. Checkpoints
    resume past them, so they are files rather than state: `analyse` collects them into the record."""
    cfg, wanted = job.cfg, {s for s in job.cfg.analysis_steps if s < n_steps}  # the last step: `analyse`
    names = [name for name in cfg.analyses if ANALYSES[name].on_update]

    def at_step(step: int) -> None:
        if step not in wanted:
            return
        with torch.no_grad(), gathered_parameters(job.model):
            analyses = make_analyses(names, cfg.rank, job.targets) if job.main else []
            tables, tensors, norms = update_analyses(job, analyses)
        if not job.main:
            return
        entry = {"step": step, "analysis": tables, "delta_fro_norms": norms, "bases": None}
        if tensors:
            path = job.out / STEPS_DIR / f"step_{step}-{BASES_FILE}"
            with atomic_path(path, suffix=".safetensors") as tmp:
                save_file(tensors, str(tmp))
            entry["bases"] = job.relative(path)
        write_json_atomic(job.out / STEPS_DIR / f"step_{step}.json", entry)
        for name, rows in tables.items():
            job.tracker.log_table(f"analysis/{name}", rows, step=step)

    return at_step


def collected_step_analyses(job: Job) -> list[dict]:
    """The step analyses this run wrote (also those before a resume), in step order."""
    entries = [json.loads(p.read_text()) for p in (job.out / STEPS_DIR).glob("step_*.json")]
    wanted = {s for s in job.cfg.analysis_steps if s < job.record.steps}
    return sorted((e for e in entries if e["step"] in wanted), key=lambda e: e["step"])


def analyse(job: Job) -> None:
    """Stage 5: ΔW per adapted matrix, the configured analyses on it, their tables / tensors / figures; weights."""
    record, model = job.record, job.model
    with gathered_parameters(model):  # FSDP: whole matrices for the analyses and the saved weights
        tables, tensors, record.delta_fro_norms = update_analyses(job, job.analyses if job.main else [])
        for name, rows in tables.items():
            record.analysis[name] = rows
            job.tracker.log_table(f"analysis/{name}", rows, step=record.steps)
            if job.tracker.location:  # a real W&B run: the analysis's figure as an image
                path = job.out / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)  # the run directory may not exist yet
                analysis = next(a for a in job.analyses if a.name == name)
                if analysis.figure(rows, path, f"{name}: {record.run_dir}"):
                    # its own key: under the table's key the image would replace the table in W&B
                    job.tracker.log_image(f"analysis/{name}_figure", str(path), step=record.steps)
        if tensors:
            with atomic_path(job.out / BASES_FILE, suffix=".safetensors") as tmp:
                save_file(tensors, str(tmp))
            record.artifacts["bases"] = job.relative(job.out / BASES_FILE)
        if job.main and job.cfg.analysis_steps:
            record.analysis_by_step = collected_step_analyses(job)
        if job.cfg.save_weights and job.main:
            log.info("saving the weights to %s", job.out / "weights")
            with atomic_dir(job.out / "weights") as tmp:
                job.variant.save(job.accelerator.unwrap_model(model), tmp)
            record.artifacts["weights"] = job.relative(job.out / "weights")
            if job.cfg.logger.get("log_model"):
                job.tracker.log_artifact(f"weights-{wandb_run_id(record.identity)}", str(job.out / "weights"))


def run_job(cfg, overrides: list[str] = (), group: str | None = None, raise_errors: bool = True) -> RunRecord:
    """Run one configured job and write its record (also when it fails after validation). Returns the record.

    Bad input raises `ConfigError` before anything is written (also when the data or the model shows it, in
    `build`: the tracker starts after them). In a multi-process job every process
    trains; only the main process writes (result, bases, weights, W&B)."""
    variant, targets, analyses = validate_job(cfg)
    identity = identity_of(cfg)
    root = Path(cfg.paths.results_dir)
    out = root / identity.relative_dir()
    main = is_main_process()
    existing = read_record(out / RESULT_FILE, root)
    if existing and existing.status == Status.COMPLETED and not cfg.overwrite:
        if main:
            say(f"[loralab] skip: {out / RESULT_FILE} exists (completed); pass overwrite=true to re-run")
        existing.skipped = True
        return existing
    record = RunRecord(
        identity=identity,
        run_dir=out.relative_to(root).as_posix(),
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        provenance=provenance(),
        overrides=list(overrides),
    )
    job = Job(cfg, record, out, root, variant, targets, analyses, main=main, group=group)
    failure, start, memory = None, time.perf_counter(), PeakMemory()
    try:
        with memory:
            for stage in (build, prepare, train_stage, analyse):
                log.info("%s: %s", record.run_dir, stage.__name__)  # Hydra's run.log, SLURM logs
                stage(job)
        record.status = Status.COMPLETED
    except Exception as exc:  # recorded, then re-raised for single runs; a sweep goes on to its next job
        if isinstance(exc, ConfigError) and job.tracker is None:
            # bad input that only the data or the model shows: like validation's, nothing is written (no result,
            # no W&B run); run.py prints it in one line, a sweep lists it and goes on
            raise
        failure = exc
        record.status = Status.FAILED
        record.error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
            "step": getattr(exc, "step", None),
        }
    record.wall_time_s = round(time.perf_counter() - start, 2)
    record.memory = memory.report()
    if main:
        write_json_atomic(out / RESULT_FILE, record.to_dict())
    if job.tracker is not None:
        job.tracker.summary(tracker_summary(record, cfg))
        job.tracker.finish(failed=failure is not None)
    if main:
        print(format_summary(record, out / RESULT_FILE))
    if failure is not None and raise_errors:
        raise failure
    return record


__all__ = ["NonFiniteLossError", "run_job", "check_inputs", "count_parameters"]
