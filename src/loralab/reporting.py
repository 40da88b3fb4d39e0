"""How a job reports itself: the summary box it prints, and its W&B run's id, name and summary."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from loralab.record import RunRecord


def sweep_group(experiment: str, sweep_dir: str | Path) -> str:
    """A sweep's W&B group, unique across days: the sweep directory's last two parts (date and time by default)."""
    sweep_dir = Path(sweep_dir)
    return f"{experiment}/{sweep_dir.parent.name}_{sweep_dir.name}"


def wandb_id(text: str) -> str:
    """A W&B run id that is a function of `text`: the same job (or sweep) always writes into the same run."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wandb_run_id(identity) -> str:
    """The identity part of a job's W&B run ids (and its model artifact's name)."""
    return wandb_id(identity.relative_dir().as_posix())


def fresh_run_id(identity, started_at: str) -> str:
    """The W&B run id of a job that starts from step 0: the identity's, plus when this start began. W&B drops every
    step below a run's current one, so a restart (overwrite=true, train.resume=false, a failed job run again) cannot
    write into an earlier attempt's run; a job resumed from a checkpoint continues the run the checkpoint names.
    Four random hex digits (the OS's, not a seeded generator) after the stamp: two starts within one second (a
    restart of a seconds-long job) must not share a run."""
    stamp = "".join(c for c in started_at.split("+")[0] if c.isalnum())  # 2026-12-02T07:26:24 -> 20261202T072624
    return f"{wandb_run_id(identity)}-{stamp}-{secrets.token_hex(2)}"


def tracker_summary(record: RunRecord, cfg) -> dict:
    """The W&B summary: the record's outcome in flat keys (the metrics are there once, from the final log)."""
    out = {
        "status": record.status.value,
        "steps": record.steps,
        "train_time_s": record.train_time_s,
        "init_time_s": record.init_time_s,
        "wall_time_s": record.wall_time_s,
        **{f"params/{k}": v for k, v in record.params.items()},
        **{f"memory/{k}": v for k, v in record.memory.items()},
    }
    if record.steps and record.train_time_s:
        per_step = cfg.train.batch_size * cfg.train.grad_accum * (record.processes or 1)
        out["examples_per_s"] = round(record.steps * per_step / record.train_time_s, 2)
        if record.tokens:  # text tasks: non-pad input tokens
            out["tokens_per_s"] = round(record.tokens / record.train_time_s, 2)
    if record.error:
        out |= {f"error/{k}": record.error.get(k) for k in ("type", "message", "step")}
    return out


def override_name(overrides: list[str]) -> str:
    """The W&B run name: the overrides as typed, without those that only say where files go or how to log."""
    skip = ("paths.", "logger", "hydra.", "overwrite", "train.progress")
    return ",".join(sorted(o.lstrip("+") for o in overrides if not o.lstrip("+~").startswith(skip))) or "default"


def format_summary(record: RunRecord, path) -> str:
    params, identity = record.params, record.identity
    lines = [(k, getattr(identity, k)) for k in ("model", "task", "variant", "rank", "seed")]
    lines.append(("status", record.status.value))
    if params:
        lines.append(
            (
                "parameters",
                f"{params['trainable']:,} trainable / {params['total']:,} total ({params['trainable_percent']:.3f}%)",
            )
        )
    for key, value in record.metrics.items():
        lines.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    if record.error:
        lines.append(("error", f"{record.error['type']}: {record.error['message']}"))
    mem = record.memory
    lines += [
        ("wall time", f"{record.wall_time_s:.1f} s"),
        ("peak memory", ", ".join(f"{k} {v:,.0f}" for k, v in mem.items())),
        ("result", str(path)),
    ]
    if record.wandb_dir:
        lines.append(("wandb run", record.wandb_dir))
    width = max(len(k) for k, _ in lines)
    bar = "=" * 72
    return "\n".join([bar, *(f"{k:>{width}} : {v}" for k, v in lines), bar])
