"""Beyond one process: data-parallel training (accelerate launch, gloo on CPU), LoRA-GA's gradient estimate under
data parallelism, sweeps through Hydra's submitit and joblib launchers, and resuming a job killed mid-training."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import CONF, ROOT, TINY_TEXT, run_cli
from loralab.gradients import estimate_gradients
from loralab.models import build_model, build_tokenizer
from loralab.record import RESULT_FILE, RunRecord, Status, read_record
from loralab.reporting import wandb_run_id
from loralab.runner import check_inputs
from loralab.tasks import load_task
from loralab.trackers import Tracker, read_offline_run
from loralab.train import checkpoints, device_batches, make_accelerator, train
from loralab.variants import PrepareContext

NO_DROPOUT = ["+model.config.hidden_dropout_prob=0.0", "+model.config.attention_probs_dropout_prob=0.0"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def launch(*args: str, cwd: Path, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/accelerate_ddp.yaml --num_processes N run.py ...` (gloo on CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / "accelerate_ddp.yaml"),
    ]
    cmd += ["--num_processes", str(processes), str(ROOT / "run.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def only_result(root: Path) -> RunRecord:
    (path,) = Path(root).rglob(RESULT_FILE)
    return read_record(path)


def adapter(root: Path, record: RunRecord) -> dict[str, torch.Tensor]:
    """The saved PEFT adapter of a run (its weights artifact, relative to the results root)."""
    return load_file(str(Path(root) / record.artifacts["weights"] / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    """2 processes x 8 examples vs 1 x 16 (LoRA, dropout off): the same loss curve and trained adapter, to float32
    reduction-order noise. Only rank 0 writes: one result, one summary, one W&B run. (LoRA-GA's one DDP-specific
    step, the gradient estimate, is compared directly below: on this random tiny model its gradients are ~rank 1,
    so singular directions past the first are ill-conditioned and 1e-8 noise in G turns them.)"""
    common = [*TINY_TEXT, *NO_DROPOUT, "rank=4", f"logger.dir={tmp_path}"]
    single = run_cli(*common, "train.batch_size=16", f"paths.results_dir={tmp_path}/one", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = launch(*common, "train.batch_size=8", f"paths.results_dir={tmp_path}/two", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("status : completed") == 1  # the summary comes from rank 0 only
    one, two = only_result(tmp_path / "one"), only_result(tmp_path / "two")
    assert (one.processes, two.processes) == (1, 2) and one.steps == two.steps == 4
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2  # one per job, none from rank 1
    a, b = adapter(tmp_path / "one", one), adapter(tmp_path / "two", two)
    assert a.keys() == b.keys() and sum("lora_" in k for k in a) == 8
    for key in a:  # measured: max |difference| 7e-9 on values up to 0.18 after 4 AdamW steps (loss: 6e-8)
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    for (s1, l1), (s2, l2) in zip(one.curves["train/loss"], two.curves["train/loss"]):
        assert s1 == s2 and l2 == pytest.approx(l1, abs=1e-6)
    assert two.metrics["test/accuracy"] == one.metrics["test/accuracy"]
    assert two.metrics["test/loss"] == pytest.approx(one.metrics["test/loss"], abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _estimate(cfg, n_batches: int) -> dict[str, torch.Tensor]:
    _, targets = check_inputs(cfg)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, cfg.paths.cache_dir)
    return estimate_gradients(model, targets, device_batches(data, 1, 0, "cpu"), n_batches)


def _estimate_in_group(rank: int, world: int, port: int, cfg, n_batches: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_estimate(cfg, n_batches), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_loraga_gradient_estimate_under_two_processes_equals_one_process(compose_cfg, tmp_path):
    """7 micro-batches split 4 + 3 over two gloo processes: the all-reduced mean is the one-process mean, on both."""
    cfg = compose_cfg("model=tiny_bert", "variant=loraga", "rank=4", "task.n_train=64", *NO_DROPOUT)
    out = str(tmp_path / "grads")
    mp.start_processes(_estimate_in_group, args=(2, _free_port(), cfg, 7, out), nprocs=2, start_method="spawn")
    alone = _estimate(cfg, 7)
    for rank in (0, 1):
        shared = torch.load(f"{out}.{rank}")
        assert shared.keys() == alone.keys() and len(alone) == 4
        for name, grad in alone.items():
            rel = float((shared[name] - grad).norm() / grad.norm())
            assert rel <= 1e-6, (rank, name, rel)  # fp32 sums in another order: measured <= 7e-8


def _lora_model(cfg):
    variant, targets = check_inputs(cfg)
    torch.manual_seed(0)
    model = variant.prepare(build_model(cfg.model, cfg.task, cfg.paths.cache_dir), targets, [])
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # a non-zero ΔW
    return variant, model


def _gather_under_fsdp2(rank: int, world: int, port: int, cfg, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from loralab.train import gathered_parameters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        variant, model = _lora_model(cfg)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.bert.encoder.layer:  # as accelerate's TRANSFORMER_BASED_WRAP does
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lora = [p for n, p in model.named_parameters() if "lora_A" in n]
        assert all(isinstance(p, DTensor) for p in lora)
        with gathered_parameters(model):
            assert not any(isinstance(p, DTensor) for p in model.parameters())
            deltas = variant.delta_weights(model)
            if rank == 0:
                variant.save(model, Path(out))
        assert all(isinstance(p, DTensor) for n, p in model.named_parameters() if "lora_A" in n)
        torch.save(deltas, f"{out}/deltas.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_model_is_gathered_for_the_analyses_and_the_saved_adapter(compose_cfg, tmp_path):
    """FSDP2 (here on CPU, gloo) shards every parameter; inside gathered_parameters each process sees the whole
    matrices: ΔW and the saved PEFT adapter equal the unsharded model's exactly, and the shards come back after."""
    cfg = compose_cfg("model=tiny_bert", "rank=4", f"paths.cache_dir={tmp_path}")
    mp.start_processes(_gather_under_fsdp2, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, start_method="spawn")
    variant, model = _lora_model(cfg)
    expected = variant.delta_weights(model)
    for rank in (0, 1):
        deltas = torch.load(tmp_path / f"deltas.{rank}")
        assert deltas.keys() == expected.keys() and all(torch.equal(deltas[k], expected[k]) for k in expected)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def numbers(obj) -> list[float]:
    """Every number in a nested JSON-like structure, in a fixed order."""
    if isinstance(obj, dict):
        return [x for k in sorted(obj) for x in numbers(obj[k])]
    if isinstance(obj, list | tuple):
        return [x for v in obj for x in numbers(v)]
    return [float(obj)] if isinstance(obj, int | float) else []


@pytest.mark.slow
def test_job_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """A real SIGKILL once step_3's checkpoint exists; the relaunch continues from the newest complete checkpoint
    (ignoring a half-written one) and ends with the same metrics, loss curve and weights as a run never killed.
    LoRA-GA with dropout on: model, optimizer, scheduler, every RNG and the data position must all come back."""
    # one thread per process: multi-threaded CPU reductions differ by ~1e-7 between fresh processes, and on this
    # tiny random model LoRA-GA's near-degenerate gradient spectrum turns that into different init directions
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    args = [
        *TINY_TEXT,
        "variant=loraga",
        "rank=4",
        "train.max_steps=12",
        "train.eval_every=1",  # slow enough (~0.1 s/step) for the kill to land mid-run
        "task.n_val=200",
        "train.checkpoint_every=3",
        "logger=none",
    ]
    reference = run_cli(*args, f"paths.results_dir={tmp_path}/ref", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = only_result(tmp_path / "ref")

    results = tmp_path / "killed"
    # the killed job and its relaunch log to W&B: one run (its id is in the checkpoint), continued after the kill
    args = [*args[:-1], "logger=wandb", f"logger.dir={tmp_path}", "logger.system_metrics=false"]
    cmd = [sys.executable, str(ROOT / "run.py"), *args, f"paths.results_dir={results}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(results.rglob("checkpoints/step_3")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    run_dir = results / ref.run_dir  # the same identity, so the same place under the other results root
    assert not (run_dir / RESULT_FILE).exists()
    done = [int(p.name.removeprefix("step_")) for p in checkpoints(run_dir / "checkpoints")]
    assert done and max(done) < 12
    (run_dir / "checkpoints" / ".step_99.half").mkdir()  # a save interrupted midway: never a resume point

    relaunch = run_cli(*args, f"paths.results_dir={results}", cwd=tmp_path)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    resumed = read_record(run_dir / RESULT_FILE)
    assert resumed.resumed_from_step == max(done) and resumed.run_dir == ref.run_dir
    killed_run, relaunched_run = sorted((tmp_path / "wandb").glob("offline-run-*"))  # <time>-<run id>
    killed_id, relaunched_id = (d.name.split("-", 3)[3] for d in (killed_run, relaunched_run))  # (killed: no log)
    assert killed_id == relaunched_id == resumed.wandb_run_id  # the checkpoint names the run to continue
    assert killed_id.startswith(f"{wandb_run_id(ref.identity)}-")
    steps = [row["step"] for row in read_offline_run(relaunched_run)["history"] if "train/loss" in row]
    assert steps and min(steps) > max(done)  # the relaunch continues the run; it does not replay it
    assert not (run_dir / "checkpoints" / ".step_99.half").exists()
    assert [p.name for p in checkpoints(run_dir / "checkpoints")] == ["step_9", "step_12"]  # keep_checkpoints=2
    # CPU, same seed: identical, not only close
    # equal up to float reassociation: two fresh processes with multi-threaded CPU kernels already differ by ~1e-7
    # at the same step (seen in CI, before any resume), so bit-identity holds only on a single thread
    close = lambda x, y: (
        json.dumps(x).count(",") == json.dumps(y).count(",")
        and all(math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-7) for u, v in zip(numbers(x), numbers(y)))
    )
    assert close(resumed.curves, ref.curves) and close(resumed.metrics, ref.metrics)
    assert close(resumed.delta_fro_norms, ref.delta_fro_norms)
    a, b = adapter(tmp_path / "ref", ref), adapter(results, resumed)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def _loraga_setup(compose_cfg, tmp_path, batch_seed: int):
    cfg = compose_cfg(
        *TINY_TEXT, "variant=loraga", "rank=4", "train.max_steps=6", "train.checkpoint_every=3", "train.log_every=1"
    )
    variant, targets = check_inputs(cfg)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, str(tmp_path))
    batches = lambda size: device_batches(data, size, batch_seed, "cpu")  # other seed, other init
    ctx = PrepareContext(train_batches=batches, first_batches=batches)
    model = variant.prepare(model, targets, list(cfg.model.head_modules), ctx)
    return cfg, variant, targets, data, model


class Recorder(Tracker):
    def __init__(self):
        self.rows = []

    def log(self, metrics, step):
        self.rows += [(step, key, value) for key, value in metrics.items() if key == "train/loss"]


def test_checkpoint_overwrites_a_different_data_dependent_init(compose_cfg, tmp_path):
    """Resume onto a LoRA-GA model initialised from *other* batches (other A0, B0, W0 - s*B0*A0): the checkpoint
    carries the rewritten frozen weights and the adapter, so training ends exactly where the first run did; the
    checkpoint holds the trainable state and the adapted layers' frozen weights, not the rest of the model; the
    resumed run logs only the steps after its checkpoint (it continues the same W&B run, whose id is the run's
    identity), so the two logs together are the uninterrupted run's."""
    ckpt = tmp_path / "checkpoints"
    cfg, variant, targets, data, first = _loraga_setup(compose_cfg, tmp_path, batch_seed=0)
    torch.manual_seed(0)
    acc, logged = make_accelerator(cfg.train), Recorder()
    full = train(first, variant, data, cfg.train, 0, logged, acc, ckpt, resume=False, checkpoint_layers=targets)
    state = load_file(str(ckpt / "step_3" / "model.safetensors"))
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert trainable < set(state) and not any("embeddings" in k for k in state)
    assert {k for k in set(state) - trainable if k.endswith("weight")} == {
        f"base_model.model.{t}.base_layer.weight" for t in targets
    }

    (ckpt / "step_6").rename(tmp_path / "step_6.away")  # as if killed between the two checkpoints
    _, variant2, _, _, second = _loraga_setup(compose_cfg, tmp_path, batch_seed=1)
    frozen = f"base_model.model.{targets[0]}.base_layer.weight"
    assert not torch.equal(dict(second.named_parameters())[frozen], dict(first.named_parameters())[frozen])
    torch.manual_seed(123)  # whatever the RNG holds now: the checkpoint restores it
    acc, relogged = make_accelerator(cfg.train), Recorder()
    resumed = train(second, variant2, data, cfg.train, 0, relogged, acc, ckpt, resume=True, checkpoint_layers=targets)
    assert resumed.resumed_from == 3 and resumed.curves == full.curves and resumed.metrics == full.metrics
    assert [row[0] for row in relogged.rows] == [4, 5, 6] and len(logged.rows) == 6
    assert logged.rows[:3] + relogged.rows == logged.rows
    ours, theirs = first.state_dict(), second.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_gradient_checkpointing_changes_memory_not_numbers(compose_cfg, tmp_path):
    """Non-reentrant recompute (dropout on: its RNG is replayed) gives the same losses and adapter as without."""

    def run(*overrides):
        cfg = compose_cfg(*TINY_TEXT, "train.eval_every=0", "rank=4", *overrides)
        variant, targets = check_inputs(cfg)
        data = load_task(cfg.task, build_tokenizer(cfg.model))
        torch.manual_seed(0)
        model = variant.prepare(build_model(cfg.model, cfg.task, str(tmp_path)), targets, list(cfg.model.head_modules))
        torch.manual_seed(1)
        result = train(model, variant, data, cfg.train, 0, Tracker(), make_accelerator(cfg.train))
        return result, model, variant.delta_weights(model)

    plain, _, plain_delta = run()
    checkpointed, model, delta = run("train.gradient_checkpointing=true")
    assert all(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))
    for (_, a), (_, b) in zip(plain.curves["train/loss"], checkpointed.curves["train/loss"]):
        assert b == pytest.approx(a, abs=1e-6)
    for name, d in plain_delta.items():
        assert float(d.abs().max()) > 0
        torch.testing.assert_close(delta[name], d, rtol=1e-5, atol=1e-7)


def wandb_groups(root: Path) -> list[str]:
    """The groups of the jobs' W&B runs; the sweep's analysis run must be in the same group (checked here)."""
    runs = [read_offline_run(d) for d in sorted((root / "wandb").glob("offline-run-*"))]
    jobs = [r["group"] for r in runs if r["name"] != "sweep analysis"]
    assert {r["group"] for r in runs if r["name"] == "sweep analysis"} <= set(jobs)
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_sweep_through_a_parallel_launcher_is_aggregated_in_one_wandb_group(tmp_path, launcher):
    """Two jobs in two other processes (joblib workers / submitit subprocesses): both complete, the SweepSummary
    callback aggregates them at the end, and their W&B runs share one group named after this sweep."""
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    proc = run_cli(
        "-m",
        f"hydra/launcher={launcher}",
        *extra,
        "seed=0,1",
        *TINY_TEXT,
        f"paths.results_dir={tmp_path}/results",
        f"logger.dir={tmp_path}",
        cwd=tmp_path,  # the default sweep dir multirun/<date>/<time>: resolved once, in the launching process
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = (tmp_path / "multirun").glob("*/*/summary.csv")
    sweep = summary.parent
    rows = summary.read_text().splitlines()
    assert len(rows) == 3 and sum(",completed," in r for r in rows[1:]) == 2
    assert "2 jobs, 0 failed" in proc.stdout
    assert wandb_groups(tmp_path) == [f"default/{sweep.parent.name}_{sweep.name}"] * 2  # unique across days
    assert sorted(read_record(p).identity.seed for p in (tmp_path / "results").rglob(RESULT_FILE)) == [0, 1]


@pytest.mark.slow
def test_relaunched_sweep_skips_finished_jobs_and_resumes_the_unfinished_one(tmp_path):
    """submitit_local: after a sweep, job 1 is made 'killed after step 2' (no result, newest checkpoint gone); the
    same sweep launched again skips job 0 and resumes job 1, which ends as it did."""
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "seed=0,1",
        *TINY_TEXT,
        "train.checkpoint_every=2",
        "logger=none",
        f"paths.results_dir={tmp_path}/results",
    ]
    first = run_cli(*args, f"hydra.sweep.dir={tmp_path}/sweep1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (path,) = [p for p in (tmp_path / "results").rglob(RESULT_FILE) if read_record(p).identity.seed == 1]
    before = read_record(path)
    path.unlink()
    (path.parent / "checkpoints" / "step_4").rename(tmp_path / "step_4.away")

    again = run_cli(*args, f"hydra.sweep.dir={tmp_path}/sweep2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 jobs, 0 failed" in again.stdout
    logs = "".join(p.read_text() for p in (tmp_path / "sweep2" / ".submitit").rglob("*_log.out"))
    assert logs.count("[loralab] skip:") == 1
    after = read_record(path)
    assert after.resumed_from_step == 2 and after.curves == before.curves
    assert after.metrics == before.metrics and after.identity == before.identity


@pytest.mark.slow
def test_a_sweep_job_can_be_one_multi_process_job(tmp_path):
    """hydra.launcher.tasks_per_node=2 (one task per GPU on SLURM): the job's two tasks form one DDP group."""
    proc = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        *TINY_TEXT,
        f"paths.results_dir={tmp_path}/results",
        f"logger.dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = only_result(tmp_path / "results")
    assert record.status == Status.COMPLETED and record.processes == 2
    assert len(wandb_groups(tmp_path)) == 1  # rank 0 only
    assert "1 jobs, 0 failed" in proc.stdout


def test_slurm_launcher_config_composes(compose_cfg):
    """conf/hydra/launcher/slurm.yaml builds on submitit_slurm with the cluster settings in conf."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0 and launcher.mem_gb > 0
    assert launcher.max_num_timeout > 0  # preempted / timed-out jobs are requeued and resume from checkpoints
    GlobalHydra.instance().clear()
