import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from loralab.config import register_configs  # noqa: E402

register_configs()

# small, fast settings shared by the tests that train
QUICK = [
    "train.max_steps=4",
    "train.eval_every=2",
    "train.batch_size=8",
    "train.eval_batch_size=64",
    "task.n_val=40",
    "task.n_test=60",
    "train.progress=false",
]
TINY_TEXT = ["model=tiny_bert", "task.n_train=64", *QUICK]


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose the real conf/ tree with overrides, results and cache under tmp_path."""

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[
                    f"paths.results_dir={tmp_path}/results",
                    f"paths.cache_dir={tmp_path}/cache",
                    f"logger.dir={tmp_path}",
                    *overrides,
                ],
            )

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python run.py ...` in a subprocess (the way users run it), from the repository root; `env` adds variables."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
