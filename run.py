"""Hydra entry point: `python run.py [overrides]`, `python run.py -m variant=lora,full rank=1,4,8,64`."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from loralab.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from loralab.runner import run_job  # noqa: PLC0415  (after Hydra has parsed the command line: --help stays fast)

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = f"{cfg.experiment_name}/{Path(hydra_cfg.sweep.dir).name}" if multirun else cfg.experiment_name
    # in a sweep a failed job is recorded (result JSON, W&B run marked failed) and the next job runs
    record = run_job(cfg, overrides=list(hydra_cfg.overrides.task), group=group, raise_errors=not multirun)
    # where this job's result lives, for the end-of-sweep summary (a file: works with every Hydra launcher)
    Path(hydra_cfg.runtime.output_dir, "result_path.txt").write_text(str(Path(record["run_dir"]) / "result.json"))


if __name__ == "__main__":
    main()
