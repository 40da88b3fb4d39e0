"""LoRA-GA against closed forms and PEFT: no-op init, the first-step property, the rank-2r export, PEFT's variant."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel, get_peft_model

from loralab.config import ConfigError
from loralab.gradients import estimate_gradients
from loralab.models import build_model, build_tokenizer
from loralab.runner import check_inputs
from loralab.tasks import load_task
from loralab.train import device_batches
from loralab.variants import PrepareContext
from loralab.variants.lora import lora_layers
from loralab.variants.loraga import gradient_batches
from loralab.variants.peft_baselines import LoraGAPeft

NO_DROPOUT = ["+model.config.hidden_dropout_prob=0.0", "+model.config.attention_probs_dropout_prob=0.0"]


def tiny_setup(compose_cfg, tmp_path, *overrides, dtype=torch.float32, model="tiny_bert"):
    cfg = compose_cfg(
        f"model={model}",
        "variant=loraga",
        "rank=4",
        "task.n_train=64",
        "task.n_val=10",
        "task.n_test=10",
        *NO_DROPOUT,
        *overrides,
    )
    variant, targets = check_inputs(cfg)
    tok = build_tokenizer(cfg.model)
    data = load_task(cfg.task, tok)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, str(tmp_path)).to(dtype)
    return cfg, variant, targets, data, model


def fixed_batch(data, n=8):
    batch = data.collate(data.train[:n])
    return {k: v for k, v in batch.items()}


def repeat(batch):
    while True:
        yield batch


def repeat_ctx(batch):
    """One batch over and over: the first-rows and the shuffled gradient samples are the same stream."""
    return PrepareContext(train_batches=lambda size: repeat(batch), first_batches=lambda size: repeat(batch))


@pytest.fixture
def seeded_svd(monkeypatch):
    """torch.svd_lowrank is randomized (global RNG): make it a function of its input, for ours and PEFT's code alike,
    so the test can recompute the exact factors the official formulas give."""
    real = torch.svd_lowrank

    def svd(A, q=6, niter=2, M=None):
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return real(A, q=q, niter=niter, M=M)

    monkeypatch.setattr(torch, "svd_lowrank", svd)
    return svd


def test_init_is_a_noop_on_the_real_default_model(compose_cfg, tmp_path):
    cfg = compose_cfg("variant=loraga", "task.n_val=10", "task.n_test=10")
    variant, targets = check_inputs(cfg)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    base = build_model(cfg.model, cfg.task, str(tmp_path)).eval()
    batch = data.collate(data.test)
    with torch.no_grad():
        before = base(**batch).logits
    ctx = PrepareContext(first_batches=lambda size: device_batches(data, size, None, "cpu"))
    model = variant.prepare(base, targets, list(cfg.model.head_modules), ctx).eval()
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_B["default"].weight.abs().max() > 0  # B0 is not zero: the frozen weight absorbed s·B0·A0
    with torch.no_grad():
        after = model(**batch).logits
    assert (after - before).abs().max().item() <= 1e-5


def test_first_sgd_step_is_the_rank_2r_truncated_gradient(compose_cfg, tmp_path):
    """With scale `gd` and plain SGD, ΔW after one step = −η·(G's rank-2r truncation) + O(η²): its relative error
    to the full gradient is the Eckart–Young optimum Σ_{i>2r} σ_i² / Σ σ_i²."""
    # the real MiniLM in float64: its gradients have a spread spectrum (a random tiny model's are ~rank 1)
    cfg, variant, targets, data, model = tiny_setup(
        compose_cfg, tmp_path, "variant.scale=gd", "variant.grad_batches=1", dtype=torch.float64, model="minilm"
    )
    batch = fixed_batch(data)
    grads = estimate_gradients(copy.deepcopy(model), targets, repeat(batch), 1)
    torch.manual_seed(1)
    model = variant.prepare(model, targets, [], repeat_ctx(batch))
    lr = 1e-6
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(**batch).loss.backward()
    opt.step()
    deltas = variant.delta_weights(model)
    r2, optimum = 2 * variant.rank, []
    for name in targets:
        G = grads[name].double()
        sigma = torch.linalg.svdvals(G)
        eckart_young = float((sigma[r2:] ** 2).sum() / (sigma**2).sum())
        update = -deltas[name].double() / lr
        rel_err = float(((update - G) ** 2).sum() / (G**2).sum())
        assert abs(rel_err - eckart_young) < 1e-3, (name, rel_err, eckart_young)
        optimum.append(eckart_young)
    assert max(optimum) > 0.1  # the truncation is a real one: rank 8 of 384x384 gradients of rank > 8


def test_plain_lora_first_step_is_far_from_the_gradient(compose_cfg, tmp_path):
    """The contrast the method rests on: LoRA's first step (B = 0) only moves B, in the span of G·A0ᵀ."""
    from loralab.variants.lora import Lora, LoraVariantConfig

    cfg, _, targets, data, model = tiny_setup(compose_cfg, tmp_path, dtype=torch.float64, model="minilm")
    batch = fixed_batch(data)
    grads = estimate_gradients(copy.deepcopy(model), targets, repeat(batch), 1)
    lora = Lora(LoraVariantConfig(name="lora"), 4)
    torch.manual_seed(1)
    model = lora.prepare(model, targets, [])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model(**batch).loss.backward()
    opt.step()
    for name, delta in lora.delta_weights(model).items():
        G, update = grads[name].double(), -delta.double()
        cosine = float((update * G).sum() / (update.norm() * G.norm()))
        assert cosine < 0.9


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("scale", ["stable", "gd", "unit", "weightS"])
def test_directions_and_scales_follow_the_official_code(compose_cfg, tmp_path, direction, scale, seeded_svd):
    cfg, variant, targets, data, model = tiny_setup(
        compose_cfg, tmp_path, f"variant.direction={direction}", f"variant.scale={scale}", "variant.grad_batches=2"
    )
    batch = fixed_batch(data)
    grads = estimate_gradients(copy.deepcopy(model), targets, repeat(batch), 2)
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in targets}
    model = variant.prepare(model, targets, [], repeat_ctx(batch))
    r = variant.rank
    for name, layer in lora_layers(model).items():
        s = layer.scaling["default"]
        assert s == pytest.approx(16 / r**0.5)  # rsLoRA, α = 16
        U, _, V = seeded_svd(grads[name], q=min(4 * r, min(grads[name].shape)), niter=4)
        Vh = V.T
        A, B = {
            "ArB2r": (Vh[:r], U[:, r : 2 * r]),
            "A2rBr": (Vh[r : 2 * r], U[:, :r]),
            "ArBr": (Vh[1 : 2 * r : 2], U[:, 0 : 2 * r : 2]),
        }[direction]
        if scale == "weightS":
            _, S_w, _ = seeded_svd(W0[name], q=min(4 * r, 32), niter=4)
            factor = torch.sqrt(S_w[:r] / s).mean()
        else:
            factor = {"stable": 32**0.25 / 16**0.5, "gd": 1 / s, "unit": 1.0}[scale]
        torch.testing.assert_close(layer.lora_A["default"].weight, A * factor, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["default"].weight, B * factor, rtol=1e-5, atol=1e-6)
        frozen = layer.get_base_layer().weight
        torch.testing.assert_close(frozen, W0[name] - s * (B * factor) @ (A * factor), rtol=1e-5, atol=1e-6)


def test_rank_2r_export_loads_on_the_unmodified_base(compose_cfg, tmp_path):
    cfg, variant, targets, data, model = tiny_setup(compose_cfg, tmp_path)
    base = copy.deepcopy(model)
    batch = fixed_batch(data)
    model = variant.prepare(model, targets, list(cfg.model.head_modules), repeat_ctx(batch))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move A, B and the head away from their initial values
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    variant.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert loaded.peft_config["default"].r == 2 * variant.rank
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)
    # and the trained ΔW is what the export adds to the base
    for name, layer in lora_layers(loaded).items():
        torch.testing.assert_close(
            layer.get_delta_weight("default"), variant.delta_weights(model)[name], rtol=0, atol=1e-6
        )


def test_peft_lora_ga_differs_as_documented(compose_cfg, tmp_path, seeded_svd):
    """PEFT on the same gradient: A identical up to the `stable` factor (PEFT leaves A unscaled),
    B = ours / factor · diag(S[r:2r]) (PEFT multiplies singular values into B and scales only B)."""
    cfg, ours, targets, data, model = tiny_setup(compose_cfg, tmp_path)
    batch = fixed_batch(data)
    grads = estimate_gradients(copy.deepcopy(model), targets, repeat(batch), 8)
    peft_model = copy.deepcopy(model)
    model = ours.prepare(model, targets, [], repeat_ctx(batch))
    theirs = LoraGAPeft(cfg.variant, 4)
    modules = dict(peft_model.named_modules())
    for name in targets:  # hand PEFT the same gradient its preprocess_loraga would attach
        modules[name]._peft_loraga_grad = grads[name]
    peft_model = get_peft_model(peft_model, theirs.peft_config(targets, [], None))
    r, factor = 4, 32**0.25 / 16**0.5
    for name, layer in lora_layers(model).items():
        _, S, _ = seeded_svd(grads[name], q=min(4 * r, 32), niter=4)
        other = lora_layers(peft_model)[name]
        torch.testing.assert_close(
            other.lora_A["default"].weight, layer.lora_A["default"].weight / factor, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            other.lora_B["default"].weight, layer.lora_B["default"].weight * S[r : 2 * r], rtol=1e-5, atol=1e-6
        )


def test_gradient_estimate_is_the_mean_of_per_batch_gradients(compose_cfg, tmp_path):
    cfg, variant, targets, data, model = tiny_setup(compose_cfg, tmp_path, dtype=torch.float64)
    batches = [data.collate(data.train[i * 4 : (i + 1) * 4]) for i in range(3)]
    estimate = estimate_gradients(model, targets, iter(batches), 3)
    assert all(p.grad is None for p in model.parameters())  # streamed off, nothing left behind
    modules = dict(model.named_modules())
    for name in targets:
        expected = 0
        for batch in batches:
            (g,) = torch.autograd.grad(model(**batch).loss, modules[name].weight)
            expected = expected + g / 3
        torch.testing.assert_close(estimate[name].double(), expected, rtol=1e-10, atol=1e-12)


def test_gradient_cache_round_trip(compose_cfg, tmp_path):
    cache = tmp_path / "grads.safetensors"
    cfg, variant, targets, data, model = tiny_setup(compose_cfg, tmp_path, f"variant.grad_cache={cache}")
    batch = fixed_batch(data)
    fresh = copy.deepcopy(model)
    torch.manual_seed(0)
    first = variant.prepare(model, targets, [], repeat_ctx(batch))
    assert cache.exists()
    torch.manual_seed(0)
    second = type(variant)(cfg.variant, 4).prepare(fresh, targets, [], PrepareContext(train_batches=None))
    for name, layer in lora_layers(first).items():
        torch.testing.assert_close(lora_layers(second)[name].lora_A["default"].weight, layer.lora_A["default"].weight)


def test_a_missing_gradient_stream_is_refused_not_replaced(compose_cfg, tmp_path):
    """grad_sample=first without the first-rows stream raises (no silent fallback to shuffled rows), and each
    sample reads its own stream."""
    cfg, variant, targets, data, model = tiny_setup(compose_cfg, tmp_path)
    shuffled_only = PrepareContext(train_batches=lambda size: repeat(fixed_batch(data)))
    with pytest.raises(ConfigError, match="grad_sample=first .* needs PrepareContext.first_batches"):
        variant.prepare(copy.deepcopy(model), targets, [], shuffled_only)
    first, shuffled = object(), object()
    ctx = PrepareContext(train_batches=lambda size: shuffled, first_batches=lambda size: first)
    assert gradient_batches(cfg.variant, ctx) is first
    assert gradient_batches(OmegaConf.merge(cfg.variant, {"grad_sample": "shuffled"}), ctx) is shuffled
    with pytest.raises(ConfigError, match="grad_sample=shuffled .* needs PrepareContext.train_batches"):
        gradient_batches(OmegaConf.merge(cfg.variant, {"grad_sample": "shuffled"}), PrepareContext())


def test_bad_loraga_options(compose_cfg):
    from hydra.errors import ConfigCompositionException

    from loralab.config import ConfigError
    from loralab.variant_configs import LoraGAVariantConfig
    from loralab.variants.loraga import LoraGA

    with pytest.raises(ConfigCompositionException) as err:  # at composition: the options are Enum-typed
        compose_cfg("variant=loraga", "variant.direction=Ar")
    assert "Invalid value 'Ar', expected one of [ArB2r, A2rBr, ArBr]" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="scale"):
        compose_cfg("variant=loraga", "variant.scale=big")
    # a config built in code meets the variant's own check
    with pytest.raises(ConfigError, match=r"variant.direction='Ar'; choose one of \['ArB2r', 'A2rBr', 'ArBr'\]"):
        LoraGA(LoraGAVariantConfig(direction="Ar"), 8)


def test_first_step_alignment_analysis_reaches_eckart_young(compose_cfg, tmp_path):
    """The per-run analysis on the same closed form: LoRA-GA (gd) matches the rank-2r optimum, LoRA does not."""
    from loralab.analysis.first_step import FirstStepProbe
    from loralab.variants.lora import Lora, LoraVariantConfig

    cfg, variant, targets, data, model = tiny_setup(
        compose_cfg, tmp_path, "variant.scale=gd", "variant.grad_batches=1", dtype=torch.float64, model="minilm"
    )
    batch = fixed_batch(data)

    def probe_rows(variant):  # as a run does it, on its own copy of the pretrained model (two variants here)
        probe, own = FirstStepProbe(targets, batch, lr=1e-6), copy.deepcopy(model)
        probe.before_prepare(own)
        own = variant.prepare(own, targets, [], repeat_ctx(batch))
        return probe.after_prepare(own, variant)

    ga = probe_rows(variant)
    plain = probe_rows(Lora(LoraVariantConfig(name="lora"), 4))
    for g, p in zip(ga, plain):
        assert abs(g["rel_error"] - g["eckart_young_2r"]) < 1e-3
        assert g["cosine"] > p["cosine"]
