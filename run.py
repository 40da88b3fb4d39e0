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
from loralab.config import ConfigError, register_configs

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
    from loralab.record import RESULT_FILE, Status  # noqa: PLC0415  (after Hydra has parsed the command line)
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
        return no_value(cfg, hydra_cfg)
    # where this job's result lives, for the end-of-sweep summary (a file: works with every Hydra launcher)
    if is_main_process():
        result = Path(cfg.paths.results_dir, record.run_dir, RESULT_FILE)
        Path(hydra_cfg.runtime.output_dir, "result_path.txt").write_text(str(result.resolve()))
    # the value a hyperparameter sweeper (e.g. hydra/sweeper=optuna) optimises: `objective`, e.g. val/accuracy
    if not cfg.objective:
        return None
    if cfg.objective in record.metrics:
        return float(record.metrics[cfg.objective])
    if record.status == Status.COMPLETED:  # a metric the task does not report: every trial would miss it
        have = sorted(k for k in record.metrics if not k.startswith("best/"))
        raise ConfigError(f"objective={cfg.objective!r}: the run reports {have}")
    return no_value(cfg, hydra_cfg)  # a failed job (e.g. a diverging lr)


def no_value(cfg: DictConfig, hydra_cfg) -> float | None:
    """What a refused or failed job gives a sweeper. Optuna's sweeper stops the whole study at the first trial
    whose value is NaN or not a float (`hydra.sweeper.max_failure_rate` defaults to 0), so under a sweeper with a
    direction the job is the worst value there is (-inf when maximising, +inf when minimising): the study goes on
    and its sampler moves away; the sweep's table lists the job as refused or failed. Without a direction: NaN."""
    if not cfg.objective:
        return None
    direction = str(hydra_cfg.sweeper.get("direction") or "").lower()
    if "max" in direction:
        return float("-inf")
    return float("inf") if "min" in direction else float("nan")


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
    except ConfigError as exc:  # e.g. an `objective` the run does not report (a sweeper's first trial finds it)
        if wants_full:
            raise
        _usage_error(exc)
    except Exception as exc:  # a failed single job (its record is written) or a failed sweep
        if wants_full:
            raise
        _report_and_exit(exc)
