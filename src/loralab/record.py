"""The run record: the one documented type a job writes (`result.json`) and every consumer reads.

A run's **identity** is computed from its *resolved* config, never from the command line or a directory name:
the readable parts (experiment, model, task, variant, rank, seed, effective target set) plus every setting that
differs from its schema default, as resolved values (so `train.lr=1e-3` and `train.lr=0.001` are one run). Settings
marked `NOT_IDENTITY` on the schema (logging, checkpointing, where files live) are left out, so changing one reuses
the run. Comparing with schema defaults, not with a list of what was typed, also means that a new schema field with
a default leaves every existing identity unchanged. The run directory is a function of the identity:

    <results>/<experiment>/<model>/<task>/<variant>/<targets>/r<rank>/seed<seed>-<key>

with `key` a short stable hash of everything but the readable parts (runs differing only in rank or seed share it).
Paths inside a record (run_dir, artifacts) are relative to the results root, so a results tree can be moved.

Schema history: 1 — untyped dict, identity in the directory name (read through `migrate`); 2 — this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

SCHEMA_VERSION = 2
RESULT_FILE = "result.json"
READABLE = ("experiment", "model", "task", "variant", "targets", "rank", "seed")
# config keys that the readable parts carry (not repeated among the hyperparameters)
_READABLE_KEYS = {"experiment_name", "model.name", "task.name", "variant.name", "rank", "seed", "targets"}
_SETUP_SECTIONS = ("model", "task")  # what the model / task options define; hashed, but not listed as hparams


class Status(str, Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Identity:
    experiment: str
    model: str
    task: str
    variant: str
    targets: str  # the named target set, or the adapted module suffixes joined by "+"
    rank: int
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)  # train / variant / top-level settings ≠ schema default
    setup: dict[str, Any] = field(default_factory=dict)  # model / task settings ≠ schema default
    key: str = ""  # hash of hparams + setup: equal for runs that differ only in the readable parts

    def relative_dir(self) -> Path:
        return Path(self.experiment, self.model, self.task, self.variant, self.targets, f"r{self.rank}") / (
            f"seed{self.seed}-{self.key}"
        )

    def columns(self) -> dict[str, Any]:
        """Flat columns for tables: the readable parts, the key, and each hyperparameter under its dotted name."""
        return {**{k: getattr(self, k) for k in READABLE}, "key": self.key, **self.hparams}


@dataclass
class RunRecord:
    identity: Identity
    run_dir: str  # relative to the results root
    config: dict  # the resolved config
    status: Status = Status.RUNNING
    schema_version: int = SCHEMA_VERSION
    started_at: str | None = None
    provenance: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # as typed, for the reader; not the identity
    processes: int | None = None
    data: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    adapted_layers: list[str] = field(default_factory=list)
    init_time_s: float | None = None
    train_time_s: float | None = None
    wall_time_s: float | None = None
    steps: int | None = None
    resumed_from_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)  # name -> [[step, value], ...]
    delta_fro_norms: dict[str, float] = field(default_factory=dict)
    analysis: dict[str, list] = field(default_factory=dict)  # per-run analysis name -> table rows
    # the same at `analysis_steps`: [{"step", "analysis", "delta_fro_norms", "bases"}, ...], oldest first
    analysis_by_step: list[dict] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path relative to the results root
    memory: dict = field(default_factory=dict)
    error: dict | None = None  # type, message, traceback, step
    tokens: int | None = None  # non-pad input tokens trained on (text tasks), for tokens/s
    wandb_dir: str | None = None
    wandb_run_id: str | None = None  # a job resumed from a checkpoint continues it; a fresh start opens a new run
    skipped: bool = False  # returned for a completed run that was not re-run (never written)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["status"] = self.status.value
        out.pop("skipped")
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> RunRecord:
        raw = dict(raw)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"result schema {raw.get('schema_version')}: unknown fields {sorted(unknown)}")
        return cls(**raw | {"identity": Identity(**raw["identity"]), "status": Status(raw["status"])})


# --- identity ----------------------------------------------------------------------------------------------------
def _schema_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _differences(values: dict, schema: type | None, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the identity settings in `values` (a resolved section) that differ from the schema default;
    a nested section is compared field by field where its default is a dataclass (train, task.generation, ...)."""
    fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
    out = {}
    for name, value in values.items():
        f = fields.get(name)
        if f is not None and f.metadata.get("identity", True) is False:
            continue
        default = _schema_default(f) if f is not None else MISSING
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            out.update(_differences(value, type(default), f"{prefix}{name}."))
        elif f is None or value != default:
            out[prefix + name] = value
    return out


def _effective_targets(config: dict) -> str:
    model, chosen = config["model"], config.get("targets")
    if chosen:
        return chosen
    modules = list(model["target_modules"])
    named = sorted(k for k, v in (model.get("target_sets") or {}).items() if list(v) == modules)
    return named[0] if named else "+".join(modules)


def identity_of(config: dict | DictConfig) -> Identity:
    """The identity of a run from its resolved config (a DictConfig, or the plain dict a record stores)."""
    from loralab.config import ModelConfig, RunConfig, TaskConfig  # noqa: PLC0415
    from loralab.variants import get_variant  # noqa: PLC0415  (variants import torch)

    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True, enum_to_str=True)
    schemas = {"model": ModelConfig, "task": TaskConfig, "variant": get_variant(config["variant"]["name"]).config_class}
    everything = _differences({k: v for k, v in config.items() if k not in schemas}, RunConfig)
    for section, schema in schemas.items():
        everything.update(_differences(config[section], schema, f"{section}."))
    everything = {k: v for k, v in everything.items() if k not in _READABLE_KEYS}
    setup = {k: v for k, v in everything.items() if k.split(".")[0] in _SETUP_SECTIONS}
    hparams = {k: v for k, v in everything.items() if k not in setup}
    readable = {
        "experiment": config["experiment_name"],
        "model": config["model"]["name"],
        "task": config["task"]["name"],
        "variant": config["variant"]["name"],
        "targets": _effective_targets(config),
        "rank": int(config["rank"]),
        "seed": int(config["seed"]),
    }
    hashed = json.dumps({"hparams": hparams, "setup": setup}, sort_keys=True, default=str)
    key = hashlib.sha256(hashed.encode()).hexdigest()[:8]
    return Identity(**readable, hparams=dict(sorted(hparams.items())), setup=dict(sorted(setup.items())), key=key)


# --- reading -----------------------------------------------------------------------------------------------------
def migrate(raw: dict, run_dir: str) -> dict:
    """A stored record in the current schema. Version 1 (no `schema_version`) had the identity only in its directory
    name; its resolved config gives the identity, `run_dir` (where the file is, relative to the root) its place."""
    if raw.get("schema_version") == SCHEMA_VERSION:
        return raw
    if raw.get("schema_version", 1) != 1:
        raise ValueError(f"unknown result schema_version {raw.get('schema_version')!r}")
    from loralab.config import DEFAULT_ANALYSES  # noqa: PLC0415

    raw = dict(raw)
    config = dict(raw["config"])
    if "analyze" in config:  # v1's on/off switch became the list of analyses
        config["analyses"] = list(DEFAULT_ANALYSES) if config.pop("analyze") else []
    raw["config"] = config
    artifacts = {}
    if raw.pop("weights_dir", None):
        artifacts["weights"] = f"{run_dir}/weights"
    for key in ("experiment", "model", "task", "variant", "rank", "seed"):
        raw.pop(key, None)
    return raw | {
        "schema_version": SCHEMA_VERSION,
        "identity": dataclasses.asdict(identity_of(raw["config"])),
        "run_dir": run_dir,
        "artifacts": artifacts,
    }


def read_record(path: str | Path, root: str | Path | None = None) -> RunRecord | None:
    """The record in `path` (migrated to the current schema), or None if there is none or it is not valid JSON
    (a result file is written atomically, so that is a file from elsewhere). `root`: the results root that
    relative paths start from (default: four levels above the run directory's experiment, as laid out above)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if root is None and raw.get("schema_version") == SCHEMA_VERSION:
        return RunRecord.from_dict(raw)
    relative = path.parent.relative_to(root) if root is not None else path.parent
    return RunRecord.from_dict(migrate(raw, relative.as_posix()))


def find_records(root: str | Path) -> list[tuple[Path, RunRecord]]:
    root = Path(root)
    return [(p, r) for p in sorted(root.rglob(RESULT_FILE)) if (r := read_record(p, root))]
