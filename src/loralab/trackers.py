"""Experiment tracking: one W&B run per job (offline unless the user sets online), or none."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Tracker:
    """No tracking (`logger=none`)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, rows: list[dict], step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: str, step: int | None = None) -> None:
        pass

    def log_artifact(self, name: str, path: str, kind: str = "model") -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass

    @property
    def location(self) -> str | None:
        return None


class WandbTracker(Tracker):
    def __init__(
        self, *, project, entity, mode, dir, group, name, tags, config, run_id, system_metrics, console, job_type=None
    ):
        import wandb  # noqa: PLC0415  (heavy; only when W&B is used)

        Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            dir=dir,
            group=group,
            name=name,
            tags=tags,
            job_type=job_type or config.get("variant", {}).get("name"),
            config=config,
            # the run id is the run's identity: a resumed job continues its own W&B run
            id=run_id,
            resume="allow",
            settings=wandb.Settings(
                console="wrap" if console else "off", silent=True, x_disable_stats=not system_metrics
            ),
            reinit="create_new",
        )
        # one step axis (the optimizer step) for every key, analysis tables included
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics, step):
        self.run.log({**metrics, "step": step}, step=step)

    def summary(self, values):
        self.run.summary.update(dict(values))

    def log_table(self, key, rows, step=None):
        import pandas as pd  # noqa: PLC0415
        import wandb  # noqa: PLC0415

        frame = pd.DataFrame(rows).map(lambda v: str(v) if isinstance(v, (list, dict)) else v)
        self._log_at({key: wandb.Table(dataframe=frame)}, step)

    def log_image(self, key, path, step=None):
        import wandb  # noqa: PLC0415

        self._log_at({key: wandb.Image(path)}, step)

    def _log_at(self, values, step):
        # at the run's final step (W&B steps only grow; the analyses belong to the trained model)
        self.run.log(values if step is None else {**values, "step": step}, step=step)

    def log_artifact(self, name, path, kind="model"):
        import wandb  # noqa: PLC0415

        artifact = wandb.Artifact(name, type=kind)
        artifact.add_dir(path)
        self.run.log_artifact(artifact)

    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)

    @property
    def location(self):
        return self.run.dir and str(Path(self.run.dir).parent)


def make_tracker(
    logger_cfg,
    *,
    group: str,
    name: str,
    tags: list[str],
    config: dict,
    run_id: str,
    main_process: bool = True,
    job_type: str | None = None,
    system_metrics: bool | None = None,
) -> Tracker:
    if logger_cfg.name == "none" or logger_cfg.mode == "disabled" or not main_process:
        return Tracker()
    if logger_cfg.name != "wandb":
        raise ValueError(f"unknown logger {logger_cfg.name!r}; known loggers: ['none', 'wandb']")
    mode = os.environ.get("WANDB_MODE", logger_cfg.mode)
    return WandbTracker(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        mode=mode,
        dir=logger_cfg.dir,
        group=logger_cfg.group or group,
        name=name,
        tags=tags,
        config=config,
        run_id=run_id,
        system_metrics=logger_cfg.system_metrics if system_metrics is None else system_metrics,
        console=logger_cfg.console,
        job_type=job_type,
    )


# --- reading an offline run back -------------------------------------------------------------------------------
# wandb >= 0.18 no longer ships a Python reader for its `.wandb` transaction log (its Go core writes it), so the
# record framing is decoded here: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then LevelDB-log style
# 32 KiB blocks of records with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each
# payload a serialized `wandb_internal_pb2.Record`.
_BLOCK, _HEADER = 32768, 7


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, parts = 7, []
    while pos + _HEADER <= len(data):
        space = _BLOCK - pos % _BLOCK
        if space < _HEADER:  # block trailer padding
            pos += space
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += space
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += _HEADER + length
        parts.append(chunk)
        if kind in (1, 4):
            yield b"".join(parts)
            parts = []


def _put(target: dict, item) -> None:
    """Items of logged media (tables, images) arrive as nested keys: rebuild {key: {field: value}}."""
    import json  # noqa: PLC0415

    keys = [item.key] if item.key else list(item.nested_key)
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """Config, history rows, summary, name, group, tags, run id, system-metric samples (`stats`) and console lines
    (`console`) and logged artifacts of an offline W&B run directory."""
    import json  # noqa: PLC0415

    from wandb.proto import wandb_internal_pb2  # noqa: PLC0415

    (log_file,) = Path(run_dir).glob("*.wandb")
    out: dict[str, Any] = {
        "config": {},
        "history": [],
        "summary": {},
        "tags": [],
        "stats": [],
        "console": [],
        "artifacts": [],
    }
    for payload in _payloads(log_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, group=run.run_group, tags=list(run.tags), id=run.run_id)
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(out["summary"], item)
        elif kind == "stats":
            out["stats"].append({i.key: json.loads(i.value_json) for i in record.stats.item})
        elif kind == "artifact":
            out["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type})
        elif kind in ("output", "output_raw"):
            out["console"].append(getattr(record, kind).line)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
