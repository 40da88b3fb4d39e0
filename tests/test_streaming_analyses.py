"""The streaming, factor-aware analyses against the full-SVD implementation they replace (kept here verbatim as the
reference) and against closed forms: exact decompositions from factors, W0 recomputed instead of copied, the same
per-run tables, and a first-step probe whose extra memory is one layer, not a model."""

import itertools
import math
import weakref

import pytest
import torch
from test_first_step import old_first_step_alignment, setup  # the old probe (reference) and the tiny BERT setup
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loralab.analysis.first_step import FirstStepProbe
from loralab.analysis.lowrank import factor_svd, random_orthonormal, top_singular_values
from loralab.analysis.per_run import make_analyses
from loralab.analysis.spectrum import spectrum_table
from loralab.analysis.subspace import as_matrix, delta_bases
from loralab.analysis.updates import matrix_updates
from loralab.variants import PrepareContext

ANALYSES = ["spectrum", "amplification", "subspace_bases"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


# ------------------------------------------------------------------ the previous implementation (b26fadb), reference
def old_amplification(W, dW, r, generator):
    W_m, dW_m = as_matrix(W), as_matrix(dW)
    r = min(r, *W_m.shape)
    rand = torch.randn(*W_m.shape, generator=generator, dtype=torch.float64)

    def top(M):
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :r], Vh[:r]

    def proj(U, Vh):
        return float(torch.linalg.matrix_norm(U.T @ W_m @ Vh.T))

    proj_dW, norm_W, norm_dW = proj(*top(dW_m)), float(W_m.norm()), float(dW_m.norm())
    if norm_dW == 0.0:
        factor = math.nan
    elif proj_dW <= max(W_m.shape) * torch.finfo(torch.float64).eps * norm_W:
        factor = math.inf
    else:
        factor = norm_dW / proj_dW
    return {"r": r, "proj_dW": proj_dW, "proj_W": proj(*top(W_m)), "proj_random": proj(*top(rand)), "norm_W": norm_W,
            "norm_dW": norm_dW, "factor": factor}  # fmt: skip


def old_tables(initial: dict, deltas: dict, rank: int) -> dict:
    """What the old per-run analyses computed: every ΔW at once, full SVDs, W0 copied before prepare."""
    spec = spectrum_table(deltas, keep_singular_values=True).to_dict("records")
    for row in spec:
        row["singular_values"] = row["singular_values"][: max(3 * rank, 16)]
    generator = gen(0)
    amp = [{"name": n, **old_amplification(initial[n], d, rank, generator)} for n, d in deltas.items()]
    bases = {}
    for n, d in deltas.items():
        bases[n] = delta_bases(d, min(rank, 64, *as_matrix(d).shape))
    return {"spectrum": spec, "amplification": amp, "bases": bases}


def new_tables(model, variant, rank, targets) -> dict:
    """The runner's analyse stage: one MatrixUpdate at a time through the configured analyses."""
    analyses = make_analyses(ANALYSES, rank, targets)
    factors = variant.factors(model)
    for update in matrix_updates(model, variant):
        for a in analyses:
            a.add(update, factors.get(update.name))
    spec, amp, bases = analyses
    t = bases.tensors()
    return {
        "spectrum": spec.rows(),
        "amplification": amp.rows(),
        "bases": {n: (t[f"{n}|dW_left"].double(), t[f"{n}|dW_right"].double()) for n in targets},
    }


# ------------------------------------------------------------------ decompositions
@pytest.mark.parametrize("shape,k", [((40, 30), 3), ((30, 50), 8), ((64, 64), 16), ((12, 5), 8)])
def test_factor_svd_equals_the_full_svd(shape, k):
    m, n = shape
    left = torch.randn(m, k, generator=gen(1), dtype=torch.float64)
    right = torch.randn(k, n, generator=gen(2), dtype=torch.float64)
    M = left @ right
    U, S, Vh = factor_svd(left, right)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(M, full_matrices=False)
    rank = min(m, n, k)
    assert S.shape == (rank,)
    assert float((S - S_ref[:rank]).abs().max()) <= 1e-8 * float(S_ref[0])
    assert float(torch.cat([S_ref[rank:], S.new_zeros(1)]).abs().max()) <= 1e-12 * float(S_ref[0])  # the rest: 0
    assert rel((U * S) @ Vh, M) < 1e-12
    # singular vectors agree up to sign (distinct singular values): compare the projectors onto each pair
    for i in range(rank):
        assert rel(torch.outer(U[:, i], U[:, i]), torch.outer(U_ref[:, i], U_ref[:, i])) < 1e-8
        assert rel(torch.outer(Vh[i], Vh[i]), torch.outer(Vh_ref[i], Vh_ref[i])) < 1e-8


def test_loraga_rank_2r_update_from_four_factors():
    m, n, r, s = 48, 36, 4, 0.7
    A, A0 = (torch.randn(r, n, generator=gen(i), dtype=torch.float64) for i in (3, 4))
    B, B0 = (torch.randn(m, r, generator=gen(i), dtype=torch.float64) for i in (5, 6))
    dW = s * (B @ A - B0 @ A0)
    U, S, Vh = factor_svd(torch.cat([s * B, -s * B0], 1), torch.cat([A, A0], 0))
    S_ref = torch.linalg.svdvals(dW)
    assert S.shape == (2 * r,) and float((S - S_ref[: 2 * r]).abs().max()) <= 1e-8 * float(S_ref[0])
    assert rel((U * S) @ Vh, dW) < 1e-12


def test_top_singular_values_reach_their_tolerance_and_are_exact_when_small():
    P = torch.linalg.qr(torch.randn(300, 300, generator=gen(7), dtype=torch.float64)).Q
    R = torch.linalg.qr(torch.randn(200, 200, generator=gen(8), dtype=torch.float64)).Q
    sigma = 1.0 / torch.arange(1, 201, dtype=torch.float64) ** 0.75  # a pretrained-like, slowly decaying spectrum
    W = P[:, :200] @ torch.diag(sigma) @ R.T
    for tol in (1e-4, 1e-8):
        top, achieved = top_singular_values(W, 8, tol=tol)
        assert achieved <= tol
        energy, exact = float(top.square().sum()), float(sigma[:8].square().sum())
        assert energy <= exact * (1 + 1e-12)  # Ritz values approach from below
        assert (exact - energy) / exact <= 20 * tol
    top, achieved = top_singular_values(W[:16], 8)  # k + oversample >= min(shape): an exact SVD
    assert achieved == 0.0 and rel(top, torch.linalg.svdvals(W[:16])[:8]) < 1e-14


def test_top_singular_values_report_an_honest_tolerance_on_a_flat_spectrum():
    """A Gaussian matrix's spectrum is flat past σ_k, the hard case: 16 passes do not reach 1e-6, and the reported
    tolerance (the last pass's growth) must then still be the size of the true energy error, not a fraction of it
    (subspace iteration's last growth was 1/5 of its error on this matrix)."""
    for seed in (3, 4):
        W = torch.randn(3000, 1500, generator=gen(seed), dtype=torch.float64)
        top, achieved = top_singular_values(W, 8)
        exact = float(torch.linalg.svdvals(W)[:8].square().sum())
        error = (exact - float(top.square().sum())) / exact
        assert 1e-6 < achieved and 0 <= error <= 2 * achieved, (seed, error, achieved)


def test_top_singular_values_are_exact_once_the_basis_spans_the_column_space():
    W = torch.randn(200, 40, generator=gen(9), dtype=torch.float64)  # flat: never converges before 40 columns
    top, achieved = top_singular_values(W, 8, tol=0.0)  # blocks of 16: 16 + 16 + 8 columns, then complete
    assert achieved == 0.0 and rel(top, torch.linalg.svdvals(W)[:8]) < 1e-12


def test_random_baseline_has_the_closed_form_mean_of_a_random_matrix_svd():
    """E‖UᵀWV‖²_F = r²‖W‖²_F/(m·n) for independent Haar U (m x r), V (n x r): the QR basis and the old SVD of a
    Gaussian m x n matrix are the same distribution; both sample means land on the closed form."""
    m, n, r, draws = 20, 15, 3, 800
    W = torch.randn(m, n, generator=gen(9), dtype=torch.float64)
    expected = r * r * float(W.square().sum()) / (m * n)
    g = gen(10)
    qr = [float((random_orthonormal(m, r, g).T @ W @ random_orthonormal(n, r, g)).square().sum()) for _ in range(draws)]
    old = []
    for _ in range(draws):
        U, _, Vh = torch.linalg.svd(torch.randn(m, n, generator=g, dtype=torch.float64), full_matrices=False)
        old.append(float((U[:, :r].T @ W @ Vh[:r].T).square().sum()))
    sem = torch.tensor(qr).std().item() / draws**0.5
    assert abs(sum(qr) / draws - expected) < 4 * sem
    assert abs(sum(old) / draws - expected) < 4 * sem * 1.2


# ------------------------------------------------------------------ per-variant updates and tables
def trained(compose_cfg, tmp_path, name, dtype):
    """A prepared model whose trainable parameters moved (a non-trivial ΔW), and copies of the pretrained W0."""
    return prepared_and_moved(*setup(compose_cfg, tmp_path, name, dtype=dtype))


def prepared_and_moved(cfg, variant, targets, data, model):
    """`variant` prepared on `model`, its trainable parameters moved by noise; copies of the pretrained W0."""
    modules = dict(model.named_modules())
    pretrained = {n: modules[n].weight.detach().clone().double() for n in targets}
    batch = dict(data.collate(data.train[:8]))
    batches = lambda size: itertools.repeat(batch)  # one batch: LoRA-GA's first-rows and shuffled samples agree
    ctx = PrepareContext(train_batches=batches, first_batches=batches, total_steps=10)
    model = variant.prepare(model, targets, list(cfg.model.head_modules), ctx)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen(11), dtype=p.dtype))
    return variant, targets, model, pretrained


FP32 = {"pissa", "loraga_peft"}  # PEFT initialises these only in fp32/fp16/bf16
VARIANTS = ["lora", "rslora", "lora_plus", "loraga", "pissa", "loraga_peft", "dora", "adalora", "lierra", "full"]
LOW_RANK = {"lora", "rslora", "lora_plus", "loraga", "pissa", "loraga_peft", "adalora"}


@pytest.mark.parametrize("name", VARIANTS)
def test_matrix_updates_equal_the_variants_delta_weights_and_w0_is_the_pretrained_weight(compose_cfg, tmp_path, name):
    dtype = torch.float32 if name in FP32 else torch.float64
    variant, targets, model, pretrained = trained(compose_cfg, tmp_path, name, dtype)
    reference = variant.delta_weights(model)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    updates = list(matrix_updates(model, variant))
    assert [u.name for u in updates] == list(reference) == targets
    for u in updates:
        assert u.low_rank == (name in LOW_RANK), u.name
        assert rel(u.dense(), reference[u.name].double()) < tol, u.name
        assert rel(u.initial().double(), pretrained[u.name]) < tol, u.name  # recomputed, not copied
        assert abs(u.fro_norm() - float(reference[u.name].double().norm())) < tol * u.fro_norm()
    if name == "pissa":  # the init product is kept as factors, not as an out x in matrix
        assert all(A.shape[0] == 4 and B.shape[1] == 4 for A, B in variant.factors_init.values())
        assert not hasattr(variant, "initial_delta")


@pytest.mark.parametrize("name", ["lora", "loraga", "pissa", "dora", "lierra", "full"])
def test_streaming_tables_equal_the_full_svd_tables(compose_cfg, tmp_path, name):
    """The old path (ΔW of every matrix at once, five full SVDs each, W0 copied before prepare) and the new one
    give the same spectrum, Table 7 and bases. W's top-r energy is iterative here (tolerance 1e-6, relative), the
    random baseline a new draw of the same distribution (its own test above)."""
    dtype = torch.float32 if name in FP32 else torch.float64
    variant, targets, model, pretrained = trained(compose_cfg, tmp_path, name, dtype)
    assert_tables_equal(pretrained, model, variant, targets, 4, dtype)


def test_streaming_tables_equal_the_full_svd_tables_on_the_default_job(compose_cfg, tmp_path):
    """The same on the default job's model and adapter: real MiniLM, LoRA r = 8 on query and value (12 matrices of
    384 x 384), its factors noised instead of trained, float64."""
    from loralab.config import target_modules, validate
    from loralab.models import build_model, build_tokenizer
    from loralab.targets import find_targets
    from loralab.tasks import load_task
    from loralab.variants import get_variant

    cfg = compose_cfg("task.n_train=16", "task.n_val=4", "task.n_test=4")  # the default job, fewer examples
    validate(cfg)
    assert (cfg.model.name, cfg.variant.name, cfg.rank) == ("minilm", "lora", 8)
    variant = get_variant(cfg.variant.name)(cfg.variant, cfg.rank)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, str(tmp_path)).to(torch.float64)
    targets = find_targets(model, target_modules(cfg), exclude=list(cfg.model.head_modules))
    assert len(targets) == 12 and all(t.endswith(("query", "value")) for t in targets)
    variant, targets, model, pretrained = prepared_and_moved(cfg, variant, targets, data, model)
    assert_tables_equal(pretrained, model, variant, targets, 8, torch.float64)


def assert_tables_equal(pretrained, model, variant, targets, rank, dtype):
    old = old_tables(pretrained, variant.delta_weights(model), rank)
    new = new_tables(model, variant, rank, targets)
    tol = 1e-5 if dtype == torch.float32 else 1e-8
    assert all(len(old[k]) == len(new[k]) == len(targets) for k in old)
    for o, n in zip(old["spectrum"], new["spectrum"]):
        assert o["name"] == n["name"] and o["shape"] == n["shape"]
        for key in ("fro_norm", "sigma_max", "stable_rank"):
            assert n[key] == pytest.approx(o[key], rel=tol), (n["name"], key)
        assert (n["rank_energy"], n["numerical_rank"]) == (o["rank_energy"], o["numerical_rank"])
        assert len(n["singular_values"]) == len(o["singular_values"])
        assert max(abs(a - b) for a, b in zip(n["singular_values"], o["singular_values"])) <= tol * o["sigma_max"]
    for o, n in zip(old["amplification"], new["amplification"]):
        assert o["name"] == n["name"] and o["r"] == n["r"]
        for key in ("proj_dW", "norm_W", "norm_dW", "factor"):
            assert n[key] == pytest.approx(o[key], rel=tol), (n["name"], key)
        assert n["proj_W_tol"] <= 1e-6 and n["proj_W"] == pytest.approx(o["proj_W"], rel=1e-5)
        assert 0 < n["proj_random"] <= n["proj_W"] * (1 + 1e-6)
    for name_ in targets:  # the same subspaces (projectors: singular vectors are defined up to sign), saved in fp32
        for new_basis, old_basis in zip(new["bases"][name_], old["bases"][name_]):
            assert rel(new_basis @ new_basis.T, old_basis @ old_basis.T) < (1e-5 if dtype == torch.float32 else 1e-6)


# ------------------------------------------------------------------ the probe's memory
class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive, and their peak: every op's fresh outputs."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._free, key, storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.now -= nbytes


def model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def adapter_bytes(model):
    """Bytes of the adapters' parameters (PEFT's and LieRA's are all named lora_*; a trained head is not counted)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def held_at_once(model, variant):
    """(bytes alive while every MatrixUpdate is held, as the probe holds them; bytes of every ΔW formed)."""
    with LiveBytes() as held:
        updates = list(matrix_updates(model, variant))
        now = held.now
    return now, sum(u.shape.numel() * 4 for u in updates)  # ΔW in fp32


@pytest.mark.parametrize("name", ["lora", "loraga", "lierra", "pissa_lierra", "dora_lierra"])
def test_probe_extra_memory_is_one_layer_not_a_model(compose_cfg, tmp_path, name):
    """The old probe (two deep copies, every G at once) peaks above a model's bytes; the new one, activations of a
    2-example batch included, stays below a quarter of them, and its parameters keep their storage. The updates it
    holds across its backward cost at most 2 adapters (LoRA-GA's [s·B, −s·B0]·[A; A0]), less than every ΔW formed
    (tiny BERT: 4 matrices of 32 x 32 at r = 4, so the adapter is a quarter of the ΔW bytes)."""
    cfg, variant, targets, data, model = setup(compose_cfg, tmp_path, name, dtype=torch.float32)
    batch = dict(data.collate(data.train[:2]))
    batches = lambda size: itertools.repeat(batch)
    ctx = PrepareContext(train_batches=batches, first_batches=batches)
    torch.nn.Module.requires_grad_(model.get_input_embeddings(), False)
    size = model_bytes(model)
    with LiveBytes() as old:
        old_first_step_alignment(model, variant, targets, batch)
    probe = FirstStepProbe(targets, batch)
    with LiveBytes() as before:
        probe.before_prepare(model)
    model = variant.prepare(model, targets, [], ctx)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with LiveBytes() as after:
        probe.after_prepare(model, variant)
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == storages  # restored in place
    assert old.peak > size  # the test can fail: a copy of the model is seen
    assert before.peak < 0.25 * size and after.peak < 0.25 * size, (before.peak, after.peak, size)
    held, dense = held_at_once(model, variant)
    assert 0 < held <= 2 * adapter_bytes(model) < dense, (held, adapter_bytes(model), dense)


CONV_VARIANTS = ["lora", "dora", "pissa", "lierra", "pissa_lierra", "dora_lierra", "full"]
CONV_CASES = [(name, "loralib") for name in CONV_VARIANTS] + [("lora", "peft"), ("dora", "peft")]


@pytest.mark.parametrize("name,layout", CONV_CASES)
def test_matrix_updates_on_conv_kernels_in_loralibs_layout(compose_cfg, tmp_path, name, layout):
    """Conv kernels (a depthwise and a strided conv, loralib's layout; PEFT's cannot adapt the depthwise one at
    r = 2) and a linear layer: each update equals the variant's delta_weights, W0 the pretrained kernel, a
    factor-form SVD gives ΔW's own singular values, and holding every update costs one adapter (PiSSA two)."""
    from loralab.models import build_model, build_tokenizer
    from loralab.targets import find_targets
    from loralab.tasks import load_task
    from loralab.variants import get_variant

    convs = "downsampling_layer.1,dwconv" if layout == "loralib" else "downsampling_layer.1"
    cfg = compose_cfg(
        "model=tiny_convnext", "task=digits_transfer", f"variant={name}", "rank=2", "task.n_val=10", "task.n_test=10",
        f"model.target_modules=[{convs},pwconv1]", *([f"variant.conv_layout={layout}"] if layout == "peft" else []),
    )  # fmt: skip
    variant = get_variant(cfg.variant.name)(cfg.variant, cfg.rank)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    dtype = torch.float32 if name == "pissa" else torch.float64
    model = build_model(cfg.model, cfg.task, str(tmp_path)).to(dtype)
    targets = find_targets(model, list(cfg.model.target_modules), exclude=list(cfg.model.head_modules))
    assert any("dwconv" in t for t in targets) == (layout == "loralib") and any("downsampling" in t for t in targets)
    variant, targets, model, pretrained = prepared_and_moved(cfg, variant, targets, data, model)
    reference = variant.delta_weights(model)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    if name != "full":  # (full fine-tuning's W0 is the variant's own copy)
        held, _ = held_at_once(model, variant)
        copies = 2 if name == "pissa" else 1  # PiSSA's linear layer: [s·B, −s·B0]·[A; A0]
        assert 0 < held <= copies * adapter_bytes(model), (held, adapter_bytes(model))
    updates = list(matrix_updates(model, variant))
    assert [u.name for u in updates] == list(reference) == targets
    for u in updates:
        ref = reference[u.name].double()
        assert rel(u.dense(), ref) < tol, u.name
        assert rel(u.initial().double(), pretrained[u.name]) < tol, u.name
        full = torch.linalg.svdvals(ref.reshape(ref.shape[0], -1))
        assert torch.allclose(u.singular_values().double()[: full.numel()], full, atol=tol * float(full[0])), u.name
