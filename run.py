"""Hydra entry point: `python run.py [overrides]`, `python run.py -m variant=lora,full rank=1,4,8,64`.

Multi-GPU: `accelerate launch --config_file launch/accelerate_ddp.yaml run.py ...` (or torchrun); on SLURM a sweep's
job may span several tasks (`hydra/launcher=slurm hydra.launcher.tasks_per_node=4`), one process per GPU."""

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from loralab.cli_errors import USAGE_ERROR_EXIT, composition_error_line, traceback_requested
from loralab.cli_help import help_text
from loralab.config import register_configs

register_configs()
os.environ.setdefault("MPLBACKEND", "Agg")  # the command line draws into files (the sweep's analysis run)


def export_submitit_ranks() -> None:
    """A job that submitit runs as several tasks is one torch.distributed job: give each task the variables torchrun
    would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); accelerate then picks its device from LOCAL_RANK."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):
        return
    import submitit  # noqa: PLC0415  (only under the submitit launchers)

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from loralab.config import ConfigError  # noqa: PLC0415  (after Hydra has parsed the command line)
    from loralab.record import RESULT_FILE  # noqa: PLC0415
    from loralab.reporting import sweep_group  # noqa: PLC0415
    from loralab.runner import is_main_process, run_job  # noqa: PLC0415

    export_submitit_ranks()
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # one W&B group per sweep, unique across days; the sweep dir is resolved once by the launching process, so
    # every job (here, a joblib worker or a SLURM task) names the same group
    group = sweep_group(cfg.experiment_name, hydra_cfg.sweep.dir) if multirun else cfg.experiment_name
    sweep_params = hydra_cfg.sweeper.get("params") or {}
    if sweep_params and not multirun:  # a preset's sweep only runs with -m; say so instead of running one job silently
        listed = ", ".join(f"{k}={v}" for k, v in sweep_params.items())
        print(f"[loralab] note: this config defines a sweep ({listed}); add -m to run it. Running one job.")
    # in a sweep a failed job is recorded (result JSON, W&B run marked failed) and the next job runs
    try:
        record = run_job(cfg, overrides=list(hydra_cfg.overrides.task), group=group, raise_errors=not multirun)
    except ConfigError as exc:  # bad input: nothing was loaded or written; a sweep lists it and goes on
        if not multirun:  # one line, exit status 2 (a usage error, as argparse's); the traceback on request
            if traceback_requested(sys.argv[1:]):
                raise
            _usage_error(exc)
        print(f"[loralab] job {hydra_cfg.job.num} not run: ConfigError: {exc}")
        Path(hydra_cfg.runtime.output_dir, "config_error.txt").write_text(str(exc))
        return
    # where this job's result lives, for the end-of-sweep summary (a file: works with every Hydra launcher)
    if is_main_process():
        result = Path(cfg.paths.results_dir, record.run_dir, RESULT_FILE)
        Path(hydra_cfg.runtime.output_dir, "result_path.txt").write_text(str(result.resolve()))
    # the value a hyperparameter sweeper (e.g. hydra/sweeper=optuna) optimises: `objective`, e.g. val/accuracy
    if cfg.objective:
        value = record.metrics.get(cfg.objective)
        return float(value) if value is not None else float("nan")
    return None


def _usage_error(exc: Exception):
    print(f"loralab: error: {exc}", file=sys.stderr)
    sys.exit(USAGE_ERROR_EXIT)


def _report_and_exit(exc: BaseException):
    """What Hydra prints for a failed job: the traceback from our task function on, without Hydra's frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code is not main.__wrapped__.__code__:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
    sys.exit(1)


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):  # ours, before Hydra composes every option to list them (cli_help)
        print(help_text())
        sys.exit(0)
    # Hydra reports a bad override in several lines and exits 1; with HYDRA_FULL_ERROR it raises instead, so a
    # composition error reads and exits (2) like every other bad input
    wants_full = os.environ.get("HYDRA_FULL_ERROR") == "1" or traceback_requested(sys.argv[1:])
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as exc:
        if wants_full:
            raise
        _usage_error(composition_error_line(exc))
    except Exception as exc:  # a failed single job (its record is written) or a failed sweep
        if wants_full:
            raise
        _report_and_exit(exc)
