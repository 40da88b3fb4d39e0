"""Training-loop protocol options: best-checkpoint selection, per-epoch evaluation, warmup steps, fp16 masters."""

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import TINY_TEXT
from loralab import fixtures
from loralab.config import ConfigError
from loralab.models import build_model, build_tokenizer
from loralab.runner import check_inputs, run_job
from loralab.tasks import EvalContext, load_task
from loralab.trackers import Tracker
from loralab.train import improves, make_accelerator, steps_per_epoch, train


def _setup(compose_cfg, tmp_path, *overrides):
    cfg = compose_cfg(*TINY_TEXT, "rank=4", "train.lr=5e-3", *overrides)
    variant, targets = check_inputs(cfg)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    model = variant.prepare(build_model(cfg.model, cfg.task, str(tmp_path)), targets, list(cfg.model.head_modules))
    return cfg, variant, data, model


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_select_best_restores_the_best_steps_adapter(compose_cfg, tmp_path):
    """Validation at steps 2, 4 and 6 (the last) reports losses 3, 1, 2 (scripted over the real evaluation): the
    adapter of step 4 is back in the model before the test evaluation, the frozen weights are untouched, and the
    record holds the selected and the last validation side by side."""
    cfg, variant, data, model = _setup(
        compose_cfg, tmp_path, "train.max_steps=6", "train.eval_every=2", "train.select_best=loss"
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    scripted, seen, real = iter([3.0, 1.0, 2.0]), [], data.evaluate

    def evaluate(net, examples, ctx):
        metrics = real(net, examples, ctx)
        if ctx.split == "val":
            metrics["loss"] = next(scripted)
            seen.append(trainable(net))
        return metrics

    data.evaluate = evaluate
    result = train(model, variant, data, cfg.train, 0, Tracker(), make_accelerator(cfg.train))
    assert [step for step, _ in result.curves["val/loss"]] == [2, 4, 6]
    now = trainable(model)
    assert all(torch.equal(now[n], seen[1][n]) for n in now)  # step 4's adapter
    assert any(not torch.equal(now[n], seen[2][n]) for n in now)  # not the last step's
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert result.metrics["best/step"] == 4 and result.metrics["val/loss"] == 1.0
    assert result.metrics["final/val/loss"] == 2.0
    data.evaluate = real
    ctx = EvalContext(make_accelerator(cfg.train), cfg.train.eval_batch_size, "test")
    assert result.metrics["test/accuracy"] == real(model, data.test, ctx)["accuracy"]  # the restored adapter's


def test_select_best_by_a_higher_is_better_metric_keeps_the_final_step_when_it_wins(compose_cfg, tmp_path):
    cfg, variant, data, model = _setup(
        compose_cfg, tmp_path, "train.max_steps=4", "train.eval_every=2", "train.select_best=metric"
    )
    scripted, real = iter([0.5, 0.9]), data.evaluate

    def evaluate(net, examples, ctx):
        metrics = real(net, examples, ctx)
        return metrics | ({"accuracy": next(scripted)} if ctx.split == "val" else {})

    data.evaluate = evaluate
    result = train(model, variant, data, cfg.train, 0, Tracker(), make_accelerator(cfg.train))
    assert result.metrics["best/step"] == 4 and result.metrics["val/accuracy"] == 0.9


def test_improves_knows_which_way_each_metric_goes():
    assert improves("loss", 1.0, 2.0) and not improves("loss", 2.0, 1.0)
    assert improves("perplexity", 3.0, 4.0) and improves("eval_loss", 0.1, 0.2)
    assert improves("accuracy", 0.9, 0.8) and improves("gsm8k_accuracy", 0.5, 0.4) and not improves("f1", 0.1, 0.2)
    assert improves("accuracy", 0.1, None) and not improves("loss", float("nan"), None)


def test_every_epoch_evaluates_val_and_test_and_records_the_best_test_epoch(compose_cfg, tmp_path):
    """64 examples in batches of 8: 8 steps an epoch; 3 epochs validate (and test) at steps 8, 16 and 24."""
    cfg, variant, data, model = _setup(
        compose_cfg,
        tmp_path,
        "train.max_steps=0",
        "train.epochs=3",
        "train.eval_every=1",
        "train.eval_unit=epochs",
        "train.eval_test=true",
    )
    assert steps_per_epoch(cfg.train, len(data.train)) == 8
    result = train(model, variant, data, cfg.train, 0, Tracker(), make_accelerator(cfg.train))
    assert result.steps == 24
    assert [s for s, _ in result.curves["val/accuracy"]] == [8, 16, 24]
    test_curve = result.curves["test/accuracy"]
    assert [s for s, _ in test_curve] == [8, 16, 24]
    best_step, best = max(test_curve, key=lambda point: (point[1], -point[0]))  # the first of equal values
    assert result.metrics["test_best/accuracy"] == best and result.metrics["test_best/step"] == best_step
    assert result.metrics["test/accuracy"] == test_curve[-1][1]  # test/*: the last epoch


@pytest.mark.parametrize(
    ("n_train", "batch", "world", "accum", "expected"),
    [(64, 8, 1, 1, 8), (65, 8, 1, 1, 8), (64, 8, 2, 1, 4), (64, 8, 1, 3, 3), (5, 8, 1, 1, 1)],
)
def test_steps_per_epoch_matches_the_loader(compose_cfg, n_train, batch, world, accum, expected):
    cfg = compose_cfg(f"train.batch_size={batch}", f"train.grad_accum={accum}")
    assert steps_per_epoch(cfg.train, n_train, world) == expected


def test_bad_selection_settings_fail_early(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="select_best='loss' selects among periodic validations"):
        check_inputs(compose_cfg(*TINY_TEXT, "train.select_best=loss", "train.eval_every=0"))
    with pytest.raises(ConfigCompositionException) as err:  # an enumerated setting: checked at composition
        compose_cfg(*TINY_TEXT, "train.eval_unit=epoch")
    assert "Invalid value 'epoch', expected one of [steps, epochs]" in str(err.value.__cause__)
    cfg, variant, data, model = _setup(compose_cfg, tmp_path, "train.select_best=bleu")
    with pytest.raises(ConfigError, match=r"select_best='bleu': validation reports \['accuracy'"):
        train(model, variant, data, cfg.train, 0, Tracker(), make_accelerator(cfg.train))


def test_a_misspelled_selection_metric_fails_before_training_and_leaves_no_run(compose_cfg, tmp_path):
    """Two validation examples name the metrics before the tracker starts: no W&B run, no result folder."""
    cfg = compose_cfg(*TINY_TEXT, "train.select_best=acuracy", "logger.system_metrics=false")
    with pytest.raises(ConfigError, match=r"select_best='acuracy': validation of task reports \['accuracy', .*'loss'"):
        run_job(cfg)
    assert not (tmp_path / "results").exists() and not (tmp_path / "wandb").exists()
    record = run_job(compose_cfg(*TINY_TEXT, "train.select_best=val/accuracy", "logger=none"))
    assert record.metrics["best/step"] in (2, 4)  # the val/ prefix names the same metric


def test_unsupported_gradient_checkpointing_fails_before_the_tracker_and_leaves_no_run(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "model=tiny_convnext",
        "task=digits_transfer",
        "train.gradient_checkpointing=true",
        "logger.system_metrics=false",
    )
    with pytest.raises(ConfigError, match="ConvNextV2ForImageClassification does not support gradient checkpointing"):
        run_job(cfg)
    assert not (tmp_path / "results").exists() and not (tmp_path / "wandb").exists()


def test_fp16_training_keeps_trainable_parameters_in_fp32(compose_cfg, tmp_path):
    """An fp16 model under fp16 mixed precision: LieRA's factors (created in the weights' dtype) train as fp32
    master weights, the same Parameter objects the variant holds; the frozen weights stay fp16."""
    train_dir, tests_dir = fixtures.commonsense(tmp_path)
    cfg = compose_cfg(
        "model=tiny_llama",  # no new head: under fp16 autocast (a GPU) a head trains in fp32 too; CPU has no autocast
        "task=commonsense170k",
        f"task.data_dir={train_dir}",
        f"+task.eval_data.commonsense={tests_dir}",
        "task.n_val=4",
        "task.test_limit=1",
        "task.generation.max_new_tokens=2",
        "variant=lierra",
        "rank=2",
        "model.dtype=float16",
        "train.precision=fp16",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.eval_every=0",
        "train.progress=false",
    )
    variant, targets = check_inputs(cfg)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    model = variant.prepare(build_model(cfg.model, cfg.task, str(tmp_path)), targets, [])
    factors = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert factors and all(p.dtype == torch.float16 for p in factors.values())
    before = {n: p.detach().float().clone() for n, p in factors.items()}
    train(model, variant, data, cfg.train, 0, Tracker(), make_accelerator(cfg.train))
    now = dict(model.named_parameters())
    assert all(now[n] is p and p.dtype == torch.float32 for n, p in factors.items())
    assert any(not torch.equal(p, before[n]) for n, p in factors.items())  # trained
    assert all(p.dtype == torch.float16 for n, p in now.items() if not p.requires_grad and p.is_floating_point())


def test_warmup_steps_replace_the_ratio(compose_cfg, tmp_path):
    cfg, variant, data, model = _setup(
        compose_cfg, tmp_path, "train.max_steps=6", "train.warmup_steps=4", "train.eval_every=0"
    )
    result = train(model, variant, data, cfg.train, 0, Tracker(), make_accelerator(cfg.train))
    lrs = [lr for _, lr in result.curves["train/lr"]]  # after each step: 4 warmup steps, linear decay to 0 at 6
    assert lrs == pytest.approx([cfg.train.lr * f for f in (0.25, 0.5, 0.75, 1.0, 0.5, 0.0)], rel=1e-6)


def test_a_resumed_run_keeps_the_best_checkpoint_it_had(compose_cfg, tmp_path):
    """The best adapter so far is part of the loop state a checkpoint saves: a run resumed from step 4 (best: step 2)
    selects and restores exactly what the uninterrupted run did."""

    def run(resume: bool):
        cfg, variant, data, model = _setup(
            compose_cfg,
            tmp_path,
            "train.max_steps=6",
            "train.eval_every=2",
            "train.select_best=loss",
            "train.checkpoint_every=4",
        )
        scripted, real = iter([1.0, 3.0, 2.0] if not resume else [2.0]), data.evaluate  # resumed: only step 6 left

        def evaluate(net, examples, ctx):
            metrics = real(net, examples, ctx)
            return metrics | ({"loss": next(scripted)} if ctx.split == "val" else {})

        data.evaluate = evaluate
        acc = make_accelerator(cfg.train)
        result = train(model, variant, data, cfg.train, 0, Tracker(), acc, tmp_path / "ckpt", resume=resume)
        return result, trainable(model)

    full, full_params = run(resume=False)
    assert full.metrics["best/step"] == 2
    resumed, resumed_params = run(resume=True)
    assert resumed.resumed_from == 4 and resumed.metrics == full.metrics
    assert all(torch.equal(resumed_params[n], full_params[n]) for n in full_params)
