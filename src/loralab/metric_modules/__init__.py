"""The project's metrics as Hugging Face `evaluate` modules, kept inside the package and loaded from their path.

`evaluate.load("glue", "mrpc")` fetches the metric script from the Hugging Face Hub: it fails offline and follows
whatever the hub holds that day. A module loaded from a path in this package is offline and pinned to this code,
and a caller uses it the way the field does (`load(...).compute(predictions=..., references=...)`). Each module
returns the names the field's own modules return (`glue`: accuracy, f1, matthews_correlation, pearson,
spearmanr; `code_eval`: pass@k).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

MODULES_DIR = Path(__file__).resolve().parent
MODULES = sorted(p.name for p in MODULES_DIR.iterdir() if (p / f"{p.name}.py").is_file())


@cache
def load(name: str, config_name: str | None = None):
    """`evaluate.load` of the module `name` (one of MODULES) from its directory, kept in memory (no cache files)."""
    if name not in MODULES:
        raise ValueError(f"unknown metric module {name!r}; known: {MODULES}")
    import evaluate  # noqa: PLC0415  (heavy: imported when a metric is first needed)

    return evaluate.load(str(MODULES_DIR / name), config_name, keep_in_memory=True)
