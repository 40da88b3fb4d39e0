"""One job: validate -> build -> adapt -> train -> evaluate -> record. Every outcome ends in a result file."""

from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime, timezone

import torch
from accelerate.utils import get_int_from_env, set_seed
from omegaconf import OmegaConf
from safetensors.torch import save_file

from loralab.analysis.first_step import first_step_alignment
from loralab.analysis.per_run import per_run_analysis
from loralab.config import TASK_KINDS, ConfigError, target_modules, validate
from loralab.figures import spectrum_heatmap
from loralab.io import atomic_dir, atomic_path, write_json_atomic
from loralab.models import build_model, build_skeleton, build_tokenizer
from loralab.results import BASES_FILE, RESULT_FILE, PeakMemory, override_tag, provenance, read_result, run_dir
from loralab.targets import check_rank, find_targets, matches
from loralab.tasks import check_data_path, load_task
from loralab.trackers import make_tracker
from loralab.train import (
    NonFiniteLossError,
    device_batches,
    gathered_parameters,
    make_accelerator,
    total_steps,
    train,
)
from loralab.variants import PrepareContext, get_variant
from loralab.variants.base import cpu_copy

log = logging.getLogger(__name__)


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
    return variant, targets


def is_main_process() -> bool:
    """Rank 0 of a multi-process job (torchrun, `accelerate launch`, mpirun, SLURM tasks), read from the launcher's
    variables so that it is known before accelerate starts and also when a job fails before it does."""
    return get_int_from_env(["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0


def run_job(cfg, overrides: list[str] = (), group: str | None = None, raise_errors: bool = True) -> dict:
    """Run one configured job and write its result JSON (also when it fails). Returns the record.

    In a multi-process job every process trains; only the main process writes (result, bases, weights, W&B)."""
    out = run_dir(cfg, overrides)
    main = is_main_process()
    existing = read_result(out / RESULT_FILE)
    if existing and existing.get("status") == "completed" and not cfg.overwrite:
        log.info("skipping %s: completed result exists (overwrite=true to re-run)", out)
        if main:
            print(f"[loralab] skip: {out / RESULT_FILE} exists (completed); pass overwrite=true to re-run")
        return existing | {"skipped": True}

    resolved = OmegaConf.to_container(cfg, resolve=True)
    record = {
        "status": "running",
        "experiment": cfg.experiment_name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "variant": cfg.variant.name,
        "rank": cfg.rank,
        "seed": cfg.seed,
        "run_dir": str(out),
        "overrides": list(overrides),
        "config": resolved,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance(),
    }
    tracker, failure, start, memory = None, None, time.perf_counter(), PeakMemory()
    try:
        with memory:
            variant, targets = check_inputs(cfg)
            accelerator = make_accelerator(cfg.train)
            record["processes"] = accelerator.num_processes  # data-parallel processes that trained this run
            tracker = make_tracker(
                cfg.logger,
                group=group or cfg.experiment_name,
                name=override_tag(list(overrides), keep_path_keys=True) or "default",
                tags=[
                    f"model:{cfg.model.name}",
                    f"task:{cfg.task.name}",
                    f"variant:{cfg.variant.name}",
                    f"rank:{cfg.rank}",
                    f"seed:{cfg.seed}",
                ],
                config=resolved,
                main_process=main,
            )
            record["wandb_dir"] = tracker.location
            set_seed(cfg.seed)
            tokenizer = build_tokenizer(cfg.model)
            data = load_task(cfg.task, tokenizer)
            record["data"] = {"fingerprint": data.fingerprint, "sizes": data.sizes}
            model = build_model(cfg.model, cfg.task, cfg.paths.cache_dir).to(accelerator.device)
            ctx = PrepareContext(
                train_batches=lambda size: device_batches(data, size, cfg.seed, accelerator.device),
                total_steps=total_steps(cfg.train, len(data.train), accelerator.num_processes),
            )
            first_step = []
            if cfg.analyze:  # before the variant touches the model: its first SGD step vs full fine-tuning's
                first_batch = next(device_batches(data, cfg.train.batch_size, cfg.seed, accelerator.device))
                first_step = first_step_alignment(model, variant, targets, first_batch)
            modules = dict(model.named_modules())
            initial = {n: cpu_copy(modules[n].weight) for n in targets} if cfg.analyze else {}  # W0, pretrained
            start_init = time.perf_counter()
            model = variant.prepare(model, targets, head_modules(cfg), ctx)
            record["init_time_s"] = round(time.perf_counter() - start_init, 3)
            record["params"] = count_parameters(model)
            record["adapted_layers"] = targets
            result = train(
                model,
                variant,
                data,
                cfg.train,
                cfg.seed,
                tracker,
                accelerator,
                checkpoint_dir=out / "checkpoints",
                eval_dir=out / "eval",
                resume=cfg.train.resume and not cfg.overwrite,  # overwrite=true: from scratch
                checkpoint_layers=targets,
            )
            record.update(
                metrics=result.metrics,
                curves=result.curves,
                steps=result.steps,
                train_time_s=round(result.train_time_s, 2),
                resumed_from_step=result.resumed_from,
            )
            with gathered_parameters(model):  # FSDP: whole matrices for the analyses and the saved weights
                deltas = variant.delta_weights(model)
                record["delta_fro_norms"] = {n: float(d.norm()) for n, d in deltas.items()}
                if cfg.analyze and main:
                    tables, bases = per_run_analysis(initial, deltas, variant.factors(model), cfg.rank)
                    tables["first_step"] = first_step
                    record["analysis"] = tables
                    with atomic_path(out / BASES_FILE, suffix=".safetensors") as tmp:
                        save_file(bases, str(tmp))
                    for name, rows in tables.items():
                        tracker.log_table(f"analysis/{name}", rows)
                    if tracker.location:  # a real W&B run: the ΔW spectrum heatmap as an image
                        image = spectrum_heatmap(tables["spectrum"], out / "spectrum_heatmap.png", f"ΔW spectra, {out}")
                        tracker.log_image("analysis/spectrum_heatmap", str(image))
                if cfg.save_weights and main:
                    with atomic_dir(out / "weights") as tmp:
                        variant.save(accelerator.unwrap_model(model), tmp)
                    record["weights_dir"] = str(out / "weights")
        record["status"] = "completed"
    except Exception as exc:  # recorded, then re-raised for single runs; a sweep goes on to its next job
        failure = exc
        record["status"] = "failed"
        record["error"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
            "step": getattr(exc, "step", None),
        }
    record["wall_time_s"] = round(time.perf_counter() - start, 2)
    record["memory"] = memory.report()
    if main:
        write_json_atomic(out / RESULT_FILE, record)
    if tracker is not None:
        tracker.summary(
            {k: v for k, v in record.items() if k in ("metrics", "params", "wall_time_s", "memory", "status")}
        )
        tracker.finish(failed=failure is not None)
    if main:
        print(format_summary(record, out / RESULT_FILE))
    if failure is not None and raise_errors:
        raise failure
    return record


def format_summary(record: dict, path) -> str:
    params = record.get("params") or {}
    lines = [
        ("model", record["model"]),
        ("task", record["task"]),
        ("variant", record["variant"]),
        ("rank", record["rank"]),
        ("seed", record["seed"]),
        ("status", record["status"]),
    ]
    if params:
        lines.append(
            (
                "parameters",
                f"{params['trainable']:,} trainable / {params['total']:,} total ({params['trainable_percent']:.3f}%)",
            )
        )
    for key, value in (record.get("metrics") or {}).items():
        lines.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    if record.get("error"):
        lines.append(("error", f"{record['error']['type']}: {record['error']['message']}"))
    mem = record.get("memory", {})
    lines += [
        ("wall time", f"{record['wall_time_s']:.1f} s"),
        ("peak memory", ", ".join(f"{k} {v:,.0f}" for k, v in mem.items())),
        ("result", str(path)),
    ]
    if record.get("wandb_dir"):
        lines.append(("wandb run", record["wandb_dir"]))
    width = max(len(k) for k, _ in lines)
    bar = "=" * 72
    return "\n".join([bar, *(f"{k:>{width}} : {v}" for k, v in lines), bar])


__all__ = ["NonFiniteLossError", "run_job", "check_inputs", "count_parameters"]
