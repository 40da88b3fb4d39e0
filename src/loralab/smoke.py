"""Smoke mode of every paper preset: the preset's whole pipeline (data -> model -> variant -> train -> eval ->
metrics -> result JSON) on a tiny random model of the same architecture and tiny local fixtures of the same schema
as the hub data, in seconds, on a CPU. The tests run it; so can anyone before renting GPUs:

    python -m loralab.smoke loraga_glue_t5 [--out DIR] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from loralab import fixtures
from loralab.config import register_configs
from loralab.record import RunRecord
from loralab.runner import run_job
from loralab.tasks import smoke_data

CONF = Path(__file__).resolve().parents[2] / "conf"

# what every smoke job shares: two optimizer steps of four examples, CPU, fp32, no W&B
QUICK = [
    "train.max_steps=2",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.eval_batch_size=8",
    "train.precision=no",
    "train.device=cpu",
    "train.progress=false",
    "logger=none",
    "save_weights=false",
]


def _glue(model: str, subset: str = "mnli") -> Callable[[Path], list[list[str]]]:
    def jobs(root: Path) -> list[list[str]]:
        data = fixtures.glue(root, subset)
        return [[f"model={model}", f"task=glue_{subset}", f"task.data_dir={data}", "task.max_length=32", "rank=4"]]

    return jobs


def _llama(root: Path) -> list[list[str]]:
    common = ["model=tiny_llama", "rank=4", "task.n_train=16", "task.n_val=4", "task.generation.max_new_tokens=8"]
    return [
        [
            *common,
            "task=metamath_gsm8k",
            f"task.data_dir={fixtures.metamath(root)}",
            f"+task.eval_data.gsm8k={fixtures.gsm8k(root)}",
        ],
        [
            *common,
            "task=codefeedback_humaneval",
            f"task.data_dir={fixtures.codefeedback(root)}",
            f"+task.eval_data.humaneval={fixtures.humaneval(root)}",
            "task.sandbox_timeout_s=5",
        ],
        [
            *common,
            "task=wizardlm_mtbench",
            f"task.data_dir={fixtures.wizardlm(root)}",
            f"+task.eval_data.mtbench={fixtures.mtbench(root)}",
        ],
    ]


def _commonsense(root: Path) -> list[list[str]]:
    train, tests = fixtures.commonsense(root)
    return [
        [
            "model=tiny_llama",
            "rank=4",
            f"task.data_dir={train}",
            f"+task.eval_data.commonsense={tests}",
            "task.n_val=4",
            "task.generation.max_new_tokens=8",
        ]
    ]


# the vision presets keep their tiny model and image sizes in conf/experiment/<preset>_smoke.yaml (runnable alone)
SMOKE_EXPERIMENT = {"liera_vtab": "liera_vtab_smoke", "liera_coco": "liera_coco_smoke"}


def _vtab(root: Path) -> list[list[str]]:
    return [[f"task.data_dir={smoke_data.write_vtab(root / 'vtab').parent}"]]


def _coco(root: Path) -> list[list[str]]:
    return [[f"task.data_dir={smoke_data.write_coco(root / 'coco')}"]]


# preset -> fixture writer returning the jobs (override lists) to run on top of `experiment=<preset>`
SMOKE: dict[str, Callable[[Path], list[list[str]]]] = {
    "lora_rank": _glue("tiny_roberta"),
    "lora_subspace": _glue("tiny_roberta"),
    "lora_amplification": _glue("tiny_roberta"),
    "loraga_glue_t5": _glue("tiny_t5", "mrpc"),
    "liera_glue": _glue("tiny_deberta", "stsb"),
    "loraga_llama": _llama,
    "liera_commonsense": _commonsense,
    "liera_vtab": _vtab,
    "liera_coco": _coco,
}


def compose_job(preset: str, overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        experiment = SMOKE_EXPERIMENT.get(preset, preset)
        return compose(config_name="config", overrides=[f"experiment={experiment}", *QUICK, *overrides])


def smoke_jobs(preset: str, root: Path, extra: list[str] = ()) -> list[list[str]]:
    if preset not in SMOKE:
        raise SystemExit(f"no smoke mode for preset {preset!r}; presets with one: {sorted(SMOKE)}")
    return [
        [*job, f"paths.results_dir={root / 'results'}", f"paths.cache_dir={root / 'cache'}", *extra]
        for job in SMOKE[preset](root / "fixtures")
    ]


def run_smoke(preset: str, root: Path, extra: list[str] = ()) -> list[RunRecord]:
    """Run every smoke job of `preset` under `root`; returns their result records (raises on a failed job). Their
    `run_dir`s are relative to the results root, `root / "results"`."""
    records = []
    for overrides in smoke_jobs(preset, root, extra):
        cfg = compose_job(preset, overrides)
        records.append(run_job(cfg, overrides=overrides, raise_errors=True))
    GlobalHydra.instance().clear()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(SMOKE))
    parser.add_argument("--out", type=Path, default=None, help="where fixtures and results go (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. variant=lierra")
    args = parser.parse_intermixed_args()
    root = args.out or Path(tempfile.mkdtemp(prefix=f"loralab-smoke-{args.preset}-"))
    for record in run_smoke(args.preset, root, args.overrides):
        print(f"[smoke] {args.preset}: {record.status.value} -> {root / 'results' / record.run_dir}")


if __name__ == "__main__":
    main()
