"""The two-phase first-step probe: same rows as the old copy-and-reprepare implementation, the model and the RNG
left exactly as they were, LoRA-GA's real init (and grad_cache) untouched by the probe, eval-mode gradients."""

import copy
import itertools

import pytest
import torch
from safetensors.torch import load_file

from loralab.analysis.alignment import alignment, eckart_young
from loralab.analysis.first_step import FirstStepProbe
from loralab.config import target_modules, validate
from loralab.gradients import estimate_gradients
from loralab.models import build_model, build_tokenizer
from loralab.targets import find_targets
from loralab.tasks import load_task
from loralab.train import device_batches
from loralab.variants import PrepareContext, get_variant
from loralab.variants.loraga import LoraGA

VARIANTS = ["lora", "loraga", "lierra", "full"]
NUMERIC = ["lr", "cosine", "rel_error", "rel_error_best_scale", "eckart_young_2r"]
NEW = {"eckart_young_tol"}  # the achieved tolerance of the top-2r singular values (the old code took a full SVD)


def old_first_step_alignment(
    model, variant, targets: list[str], batch: dict, lr: float | None = None, relative_step: float = 1e-3
) -> list[dict]:
    """The implementation the probe replaces (two deep copies, a second prepare on `batch` repeated), verbatim."""
    with torch.random.fork_rng():
        full = copy.deepcopy(model).eval()
        modules = dict(full.named_modules())
        weights = [modules[n].weight for n in targets]
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            grads = torch.autograd.grad(full(**batch).loss, weights)
        if lr is None:
            w_norm = sum(float(w.detach().norm()) for w in weights)
            lr = relative_step * w_norm / max(sum(float(g.norm()) for g in grads), 1e-30)
        del full
        probe = type(variant)(variant.cfg, variant.rank)
        adapted = probe.prepare(copy.deepcopy(model), targets, [], repeat_ctx(batch))
        adapted.eval()
        params = [p for p in adapted.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr)
        with torch.enable_grad():
            adapted(**batch).loss.backward()
        optimizer.step()
        deltas = probe.delta_weights(adapted)
    rows = []
    for name, G in zip(targets, grads):
        G = G.detach().cpu()
        stats = alignment(deltas[name], -lr * G)
        rows.append(
            {
                "name": name,
                "lr": lr,
                **stats,
                "rel_error_best_scale": 1 - stats["cosine"] ** 2,
                "eckart_young_2r": eckart_young(G, 2 * variant.rank),
            }
        )
    return rows


def setup(compose_cfg, tmp_path, variant, *overrides, dtype=torch.float64):
    """Tiny random BERT (dropout 0.1, BERT's default), 64 SST-2 examples; the variant and targets of the config."""
    cfg = compose_cfg(
        "model=tiny_bert",
        f"variant={variant}",
        "rank=4",
        "task.n_train=64",
        "task.n_val=10",
        "task.n_test=10",
        *(["variant.grad_batches=2"] if variant == "loraga" else []),
        *overrides,
    )
    validate(cfg)  # (the runner's check_inputs, without importing the runner)
    variant = get_variant(cfg.variant.name)(cfg.variant, cfg.rank)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, str(tmp_path)).to(dtype)
    targets = find_targets(model, target_modules(cfg), exclude=list(cfg.model.head_modules))
    return cfg, variant, targets, data, model


def first_batch(data, n=8):
    return dict(data.collate(data.train[:n]))


def repeat_ctx(batch):
    batches = lambda size: itertools.repeat(batch)  # one batch: LoRA-GA's first-rows and shuffled samples agree
    return PrepareContext(train_batches=batches, first_batches=batches)


def close(a, b, rel=1e-6, abs_=1e-10):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


def assert_rows_close(new, old):
    assert [r["name"] for r in new] == [r["name"] for r in old]
    for n, o in zip(new, old):
        assert set(n) == set(o) | NEW and n["eckart_young_tol"] <= 1e-9
        for key in NUMERIC:
            assert close(n[key], o[key]), (n["name"], key, n[key], o[key])


def state(model):
    """Every parameter and buffer (cloned), its identity, requires_grad and .grad, and the training flags."""
    return {
        "params": {n: (p.detach().clone(), id(p), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_same_state(model, before):
    after = state(model)
    assert after["params"].keys() == before["params"].keys()
    for name, (value, ident, flag, grad) in before["params"].items():
        v, i, f, g = after["params"][name]
        assert torch.equal(v, value) and v.dtype == value.dtype, name  # bit-identical
        assert (i, f) == (ident, flag), name  # the same Parameter object (an optimizer made later sees it)
        assert g is None and grad is None, name
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name
    assert after["training"] == before["training"]


@pytest.mark.parametrize("heads", [False, True], ids=["head_frozen", "head_trained"])
@pytest.mark.parametrize("name", VARIANTS)
def test_probe_rows_equal_the_old_implementation(compose_cfg, tmp_path, name, heads):
    cfg, variant, targets, data, model = setup(compose_cfg, tmp_path, name)
    batch = first_batch(data)
    torch.manual_seed(1)
    old = old_first_step_alignment(model, variant, targets, batch)
    torch.manual_seed(1)  # the run's prepare draws what the old probe's own prepare drew
    probe = FirstStepProbe(targets, batch)
    probe.before_prepare(model)
    model = variant.prepare(model, targets, list(cfg.model.head_modules) if heads else [], repeat_ctx(batch))
    new = probe.after_prepare(model, variant)
    assert_rows_close(new, old)
    if name == "full":
        assert all(r["cosine"] > 1 - 1e-9 for r in new)  # full fine-tuning's step is −lr·G itself
    else:
        assert all(0 < abs(r["cosine"]) < 1 - 1e-6 for r in new)  # a real, imperfect alignment was measured


@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("name", VARIANTS)
def test_probe_leaves_model_and_rng_exactly_as_they_were(compose_cfg, tmp_path, name, training):
    cfg, variant, targets, data, model = setup(compose_cfg, tmp_path, name, dtype=torch.float32)
    batch = first_batch(data)
    batches = lambda size: device_batches(data, size, 0, "cpu")
    ctx = PrepareContext(train_batches=batches, first_batches=batches)
    model.train(training)
    probe = FirstStepProbe(targets, batch)

    before, rng = state(model), torch.random.get_rng_state()
    probe.before_prepare(model)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_same_state(model, before)
    assert probe.lr is None and probe.w_norm > 0 and probe.ready  # lr: from ‖G‖ streamed in the variant's step

    model = variant.prepare(model, targets, list(cfg.model.head_modules), ctx)
    model.train(training)
    before, rng = state(model), torch.random.get_rng_state()
    rows = probe.after_prepare(model, variant)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_same_state(model, before)
    assert not probe.ready  # used once
    assert probe.lr > 0 and len(rows) == len(targets) and all(r["lr"] == probe.lr for r in rows)
    assert all(float(d.abs().max()) == 0 for d in variant.delta_weights(model).values())  # back at the init
    with pytest.raises(RuntimeError, match="before_prepare"):
        probe.after_prepare(model, variant)


def test_loraga_probe_never_prepares_and_the_cache_holds_the_real_estimate(compose_cfg, tmp_path, monkeypatch):
    cache = tmp_path / "grads.safetensors"
    cfg, variant, targets, data, model = setup(
        compose_cfg, tmp_path, "loraga", f"variant.grad_cache={cache}", dtype=torch.float32
    )
    batch = first_batch(data)  # the probe's batch: 8 examples; LoRA-GA estimates from 2 shuffled batches of 1
    calls = []
    real_prepare = LoraGA.prepare

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real_prepare(self, *args, **kwargs)

    monkeypatch.setattr(LoraGA, "prepare", counting)
    # the reference: the official estimate on the real training batches, from the same RNG state (dropout on)
    torch.manual_seed(7)
    reference = estimate_gradients(
        copy.deepcopy(model),
        targets,
        device_batches(data, cfg.variant.grad_batch_size, 0, "cpu"),
        cfg.variant.grad_batches,
    )
    torch.manual_seed(7)
    probe = FirstStepProbe(targets, batch)
    probe.before_prepare(model)
    assert calls == [] and not cache.exists()
    batches = lambda size: device_batches(data, size, 0, "cpu")  # the reference's batches
    ctx = PrepareContext(train_batches=batches, first_batches=batches)
    model = variant.prepare(model, targets, list(cfg.model.head_modules), ctx)
    assert calls == [variant]
    written = load_file(str(cache))
    assert set(written) == set(targets)
    for n in targets:
        assert torch.equal(written[n], reference[n]), n  # bit-identical: the probe shifted neither RNG nor data
    rows = probe.after_prepare(model, variant)
    assert calls == [variant] and len(rows) == len(targets)
    assert torch.equal(load_file(str(cache))[targets[0]], reference[targets[0]])


def test_estimate_gradients_eval_mode_is_deterministic_and_train_mode_unchanged(compose_cfg, tmp_path):
    cfg, _, targets, data, model = setup(compose_cfg, tmp_path, "lora", dtype=torch.float32)
    assert model.config.hidden_dropout_prob > 0
    batch = first_batch(data)
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))

    model.train()
    a = estimate_gradients(model, targets, [batch], 1, train_mode=False)
    b = estimate_gradients(model, targets, [batch], 1, train_mode=False)
    assert modes == [False, False] and model.training  # ran in eval mode, mode restored
    assert all(torch.equal(a[n], b[n]) for n in targets)

    model.eval()
    torch.manual_seed(3)
    c = estimate_gradients(model, targets, [batch], 1)
    d = estimate_gradients(model, targets, [batch], 1)  # dropout draws new masks
    torch.manual_seed(3)
    e = estimate_gradients(model, targets, itertools.repeat(batch), 1, train_mode=True)
    assert modes[2:] == [True, True, True] and not model.training
    assert all(torch.equal(c[n], e[n]) for n in targets)
    assert not all(torch.allclose(c[n], d[n]) for n in targets)
    assert not all(torch.allclose(a[n], c[n]) for n in targets)
    assert all(p.grad is None for p in model.parameters())
    hook.remove()
