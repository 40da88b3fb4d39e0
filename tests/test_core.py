"""Units with known answers: atomic writes, ΔW against PEFT's merge, gradient accumulation, checkpoints, load_runs."""

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_TEXT
from loralab.io import atomic_dir, write_json_atomic
from loralab.models import build_model, build_tokenizer
from loralab.record import RESULT_FILE, RunRecord, Status, identity_of
from loralab.results import load_runs
from loralab.runner import check_inputs, run_job
from loralab.trackers import Tracker
from loralab.train import make_accelerator, train


class Unserialisable:
    def __str__(self):
        raise RuntimeError("boom while writing")


def test_json_write_is_atomic(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"status": "completed", "x": float("nan")})
    assert json.loads(path.read_text()) == {"status": "completed", "x": None}  # NaN -> null: valid JSON
    with pytest.raises(RuntimeError, match="boom"):
        write_json_atomic(path, {"status": "running", "bad": Unserialisable()})
    assert json.loads(path.read_text())["status"] == "completed"  # the old file is intact
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary left behind


def test_directory_write_is_atomic(tmp_path):
    final = tmp_path / "weights"
    with atomic_dir(final) as tmp:
        (tmp / "a.safetensors").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.safetensors").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (final / "a.safetensors").read_text() == "v1" and os.listdir(tmp_path) == ["weights"]


def _tiny_lora(compose_cfg, tmp_path, *overrides):
    cfg = compose_cfg("model=tiny_bert", "rank=4", *overrides)
    variant, targets = check_inputs(cfg)
    torch.manual_seed(0)
    model = variant.prepare(build_model(cfg.model, cfg.task, str(tmp_path)), targets, list(cfg.model.head_modules))
    return cfg, variant, model


def test_lora_delta_is_s_BA_and_equals_peft_merge(compose_cfg, tmp_path):
    cfg, variant, model = _tiny_lora(compose_cfg, tmp_path, "variant.alpha=12")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a non-trivial adapter
    deltas = variant.delta_weights(model)
    modules = dict(model.named_modules())
    for name, delta in deltas.items():
        layer = modules[f"base_model.model.{name}"]
        expected = (12 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    base = {n: modules[f"base_model.model.{n}"].base_layer.weight.detach().clone() for n in deltas}
    merged = dict(model.merge_and_unload().named_modules())
    for name, delta in deltas.items():
        torch.testing.assert_close(merged[name].weight, base[name] + delta, rtol=0, atol=1e-6)


def test_full_finetune_delta_is_w_minus_w0(compose_cfg, tmp_path):
    cfg = compose_cfg("model=tiny_bert", "variant=full")
    variant, targets = check_inputs(cfg)
    model = variant.prepare(build_model(cfg.model, cfg.task, str(tmp_path)), targets, [])
    assert all(p.requires_grad for p in model.parameters())
    assert all(float(d.abs().max()) == 0 for d in variant.delta_weights(model).values())
    layer = dict(model.named_modules())[targets[0]]
    with torch.no_grad():
        layer.weight[3, 5] += 0.25
    deltas = variant.delta_weights(model)
    assert float(deltas[targets[0]][3, 5]) == pytest.approx(0.25) and float(deltas[targets[0]].abs().sum()) == 0.25


def _train_once(compose_cfg, tmp_path, *overrides):
    from loralab.tasks import load_task

    cfg, variant, model = _tiny_lora(
        compose_cfg,
        tmp_path,
        *TINY_TEXT,
        "train.eval_every=0",
        "+model.config.hidden_dropout_prob=0.0",
        "+model.config.attention_probs_dropout_prob=0.0",
        *overrides,
    )
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    result = train(model, variant, data, cfg.train, 0, Tracker(), make_accelerator(cfg.train))
    return result, variant.delta_weights(model)


def test_gradient_accumulation_equals_the_large_batch(compose_cfg, tmp_path):
    big, big_delta = _train_once(compose_cfg, tmp_path, "train.batch_size=8", "train.max_steps=2")
    acc, acc_delta = _train_once(compose_cfg, tmp_path, "train.batch_size=4", "train.grad_accum=2", "train.max_steps=2")
    assert acc.steps == big.steps == 2
    for name in big_delta:
        torch.testing.assert_close(acc_delta[name], big_delta[name], rtol=1e-4, atol=1e-6)
    assert [s for s, _ in acc.curves["train/loss"]] == [1, 2]


def test_epochs_set_the_number_of_steps(compose_cfg, tmp_path):
    # 64 examples, batch 8, accumulation 2 -> 4 optimizer steps per epoch
    result, _ = _train_once(compose_cfg, tmp_path, "train.max_steps=0", "train.epochs=1.5", "train.grad_accum=2")
    assert result.steps == 6


@pytest.mark.slow
def test_checkpoints_are_written(compose_cfg):
    cfg = compose_cfg(*TINY_TEXT, "logger=none", "train.checkpoint_every=2")
    record = run_job(cfg)
    ckpts = sorted(p.name for p in (Path(cfg.paths.results_dir) / record.run_dir).glob("checkpoints/*"))
    assert ckpts == ["step_2", "step_4"]


def test_load_runs_filters(compose_cfg, tmp_path):
    root = tmp_path / "results"
    for variant, rank, status in [("lora", 8, "completed"), ("lora", 64, "completed"), ("full", 8, "failed")]:
        cfg = compose_cfg("model=tiny_bert", f"variant={variant}", f"rank={rank}")
        identity = identity_of(cfg)
        record = RunRecord(
            identity=identity,
            run_dir=identity.relative_dir().as_posix(),
            config=OmegaConf.to_container(cfg, resolve=True),
            status=Status(status),
            metrics={"test/accuracy": rank / 100},
        )
        write_json_atomic(root / record.run_dir / RESULT_FILE, record.to_dict())
    frame = load_runs(root)
    assert len(frame) == 3 and set(frame.columns) >= {"variant", "rank", "key", "status", "test/accuracy", "record"}
    assert list(load_runs(root, variant="lora", rank=[64])["test/accuracy"]) == [0.64]
    assert list(load_runs(root, status="failed").variant) == ["full"]
    assert list(load_runs(root, status=Status.FAILED).variant) == ["full"]
    assert load_runs(root, **{"train.lr": 5e-5}).variant.tolist() == ["full"]  # full's own default lr: a column
    assert load_runs(root, nonexistent_column=1).empty
    assert all(isinstance(r, RunRecord) for r in frame.record)
    assert load_runs(tmp_path / "nothing").empty


def test_bf16_mixed_precision_trains_on_cpu(compose_cfg, tmp_path):
    fp32, _ = _train_once(compose_cfg, tmp_path, "train.max_steps=2")
    bf16, deltas = _train_once(compose_cfg, tmp_path, "train.precision=bf16", "train.max_steps=2")
    assert bf16.steps == 2 and all(torch.isfinite(d).all() for d in deltas.values())
    # same data and init: the first loss agrees with fp32 to bf16 precision
    assert bf16.curves["train/loss"][0][1] == pytest.approx(fp32.curves["train/loss"][0][1], rel=2e-2)
