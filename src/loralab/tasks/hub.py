"""Hub datasets, or a local copy of them: the same schema either way, so offline clusters and tests run the real
preprocessing code."""

from __future__ import annotations

from pathlib import Path

from loralab.config import ConfigError
from loralab.models import resolve_path

FILE_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}


def load_split(
    dataset: str | None,
    subset: str | None,
    split: str,
    data_dir: str | None = None,
    *,
    task: str | None = None,
    local_option: str = "task.data_dir",
):
    """`datasets.load_dataset(dataset, subset, split=split)`, or from `data_dir` when given: a `save_to_disk`
    directory (of a DatasetDict or one Dataset) or a file `<split>.{jsonl,json,parquet,csv}`. `task` (the task
    option) and `local_option` (the setting that names a local copy) are for the message when the hub is out of
    reach."""
    import datasets  # noqa: PLC0415  (heavy; only tasks that need it import it)

    if data_dir is None:
        if dataset is None:
            raise ConfigError(f"no dataset id and no data_dir for split {split!r}: set task.dataset or task.data_dir")
        try:
            return datasets.load_dataset(dataset, subset, split=split)
        except (ConnectionError, OSError) as exc:  # offline, firewalled, or not cached (HF_DATASETS_OFFLINE=1)
            raise ConfigError(
                f"{f'task={task}: ' if task else ''}dataset {dataset!r}{f' ({subset})' if subset else ''} could not "
                f"be loaded from the hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"without hub access pass {local_option}=<a local copy> (a save_to_disk directory or "
                f"<split>.jsonl/.parquet/.csv files)"
            ) from exc
    root = Path(resolve_path(data_dir))
    if (root / "dataset_dict.json").exists():
        saved = datasets.load_from_disk(str(root))
        if split not in saved:
            raise ConfigError(f"{root} (save_to_disk) has no split {split!r}; it has {sorted(saved)}")
        return saved[split]
    if (root / "dataset_info.json").exists() and (root / "state.json").exists():
        return datasets.load_from_disk(str(root))  # a single saved Dataset serves any split name
    for ext, builder in FILE_BUILDERS.items():
        file = root / f"{split}.{ext}"
        if file.is_file():
            return datasets.load_dataset(builder, data_files={split: str(file)}, split=split)
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "(not a directory)"
    raise ConfigError(
        f"{root}: no split {split!r} (expected a save_to_disk directory or {split}.jsonl/.json/.parquet/.csv); "
        f"found {found}"
    )


def require_columns(ds, columns, where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(f"{where}: columns {missing} missing; the data has {ds.column_names}")
