"""LieRA and its PiSSA / DoRA combinations: closed forms, PEFT HiRA equivalence, memory-saving autograd vs plain
autograd, merge, ε-policy, save/load."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import HiraConfig, get_peft_model
from torch import nn

from loralab.config import ConfigError
from loralab.targets import find_targets
from loralab.variants import get_variant
from loralab.variants.lierra import (
    DoraLiera,
    Liera,
    LieraConv2d,
    LieraLinear,
    LieraVariantConfig,
    PissaLiera,
    PissaLieraVariantConfig,
    _Conv2dOp,
    _LieraFn,
    _LinearOp,
    liera_layers,
    load_liera_adapter,
    merge_liera,
    unmerge_liera,
)

CLOSE = dict(rtol=1e-5, atol=1e-6)


def randomize(layer, scale=1.0):
    """Non-zero B (and fresh A) so the adapter does something."""
    with torch.no_grad():
        layer.lora_A.normal_(0, scale)
        layer.lora_B.normal_(0, scale)
    return layer


def conv_delta(layer):
    return (layer.lora_B @ layer.lora_A).view(layer.base_layer.weight.shape)


CONVS = {
    "regular": lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1),
    "depthwise": lambda: nn.Conv2d(4, 4, 7, padding=3, groups=4),
    "nonsquare": lambda: nn.Conv2d(4, 6, (3, 5), padding=(1, 2), groups=2),
    "same_dilated": lambda: nn.Conv2d(3, 4, (3, 5), padding="same", dilation=2),
    "reflect": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"),
}


def conv_input(conv):
    return torch.randn(2, conv.in_channels, 9, 9)


def make_form(make, form):
    """A layer of each variant's form: LieRA, DoRA+LieRA (magnitude ≠ ‖W0‖_c), PiSSA+LieRA (SVD init, exp)."""
    layer = make()
    if form == "dora":
        base = layer.base_layer
        layer = type(layer)(base, layer.lora_A.shape[0] // (base.weight.shape[2] if base.weight.dim() == 4 else 1),
                            layer.scaling, exact_exp=layer.exact_exp, dora=True)  # fmt: skip
        with torch.no_grad():
            layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    randomize(layer, 0.3)
    if form == "pissa":
        layer.exact_exp = True
        layer.pissa_init()
        with torch.no_grad():
            layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))  # away from the init
    return layer


FORMS = ["liera", "dora", "pissa"]


def test_matches_peft_hira_on_linear():
    # PEFT's HiRA computes y = W0·x + (W0 ⊙ B·A)·x with no α/r factor (s = 1). LieRA with scaling s equals HiRA
    # with B_hira = s·B (and A_hira = A); for alpha = r (s = 1) the factors are identical.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    for alpha, rank in ((4.0, 4), (16.0, 4)):
        hira = get_peft_model(copy.deepcopy(base), HiraConfig(r=rank, target_modules=["0", "2"]))
        ours = copy.deepcopy(base)
        s = alpha / rank
        for i in (0, 2):
            ours[i] = randomize(LieraLinear(ours[i], rank, s), 0.1)
            h = hira.base_model.model[i]
            with torch.no_grad():
                h.hira_A["default"].copy_(ours[i].lora_A)
                h.hira_B["default"].copy_(s * ours[i].lora_B)
        torch.testing.assert_close(ours(x), hira(x), rtol=0, atol=1e-6)


def test_linear_closed_form():
    torch.manual_seed(0)
    layer = randomize(LieraLinear(nn.Linear(12, 10), 3, 2.0), 0.3)
    x = torch.randn(4, 7, 12)
    w0, b = layer.base_layer.weight, layer.base_layer.bias
    expected = F.linear(x, w0 * (1 + 2.0 * layer.lora_B @ layer.lora_A), b)
    torch.testing.assert_close(layer(x), expected, **CLOSE)


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_closed_form(kind):
    torch.manual_seed(0)
    layer = randomize(LieraConv2d(CONVS[kind](), 4, 0.5), 0.3)
    c = layer.base_layer
    assert conv_delta(layer).shape == c.weight.shape and layer.delta().shape == c.weight.shape
    x = conv_input(c)
    if kind in ("regular", "depthwise"):
        expected = F.conv2d(x, c.weight * (1 + 0.5 * conv_delta(layer)), c.bias, c.stride, c.padding, 1, c.groups)
    else:  # string padding / padding modes: let nn.Conv2d itself run with the effective kernel
        params = {"weight": c.weight * (1 + 0.5 * conv_delta(layer)), "bias": c.bias}
        expected = torch.func.functional_call(c, params, (x,))
    torch.testing.assert_close(layer(x), expected, **CLOSE)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("exact", [False, True])
def test_merge_unmerge_exact(exact, form):
    torch.manual_seed(0)
    for make, x in (
        (lambda: LieraLinear(nn.Linear(12, 10), 3, 2.0, exact_exp=exact), torch.randn(4, 12)),
        (lambda: LieraConv2d(CONVS["depthwise"](), 2, 2.0, exact_exp=exact), conv_input(CONVS["depthwise"]())),
    ):
        layer = make_form(make, form)
        w0 = layer.base_layer.weight.detach().clone()
        y, upd = layer(x), layer.effective_update()
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.effective_update(), upd)  # still relative to the original W0
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0)
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()


def test_exact_exp_agrees_to_second_order():
    # y_exact − y_first = (W0 ⊙ (exp(sΔ) − 1 − sΔ))·x = (W0 ⊙ (sΔ)²/2)·x + O(Δ³); fp64 so t = 1e-3 is resolvable
    torch.manual_seed(0)
    first = randomize(LieraLinear(nn.Linear(12, 10).double(), 3, 2.0), 1.0)
    exact = copy.deepcopy(first)
    exact.exact_exp = True
    x = torch.randn(6, 12, dtype=torch.float64)
    b0 = first.lora_B.detach().clone()
    err = {}
    for t in (1e-2, 1e-3):
        with torch.no_grad():
            first.lora_B.copy_(t * b0)
            exact.lora_B.copy_(t * b0)
        diff = exact(x) - first(x)
        err[t] = diff.abs().max().item() / t**2
        sd = 2.0 * first.lora_B @ first.lora_A
        second = F.linear(x, first.base_layer.weight * sd**2 / 2)
        assert (diff - second).abs().max() <= 0.1 * second.abs().max()
    assert 0.5 < err[1e-2] / err[1e-3] < 2  # max|diff| shrinks by ≈ 100 when t shrinks by 10


def grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(gy)
    out = (y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad()
    return out


LAYERS = {
    "linear3d": (lambda: LieraLinear(nn.Linear(12, 10), 3, 2.0), lambda: torch.randn(3, 5, 12)),
    **{k: (lambda f=f: LieraConv2d(f(), 4, 0.5), lambda f=f: conv_input(f())) for k, f in CONVS.items()},
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_custom_autograd_matches_naive(kind, exact, form):
    torch.manual_seed(0)
    make, make_x = LAYERS[kind]
    if form == "pissa" and not exact:
        pytest.skip("PiSSA+LieRA is defined with the exponential only")
    layer = make_form(make, form)
    layer.exact_exp = exact
    x = make_x()
    custom = grads(layer, x)
    layer.naive = True
    naive = grads(layer, x)
    for c, n in zip(custom, naive):
        torch.testing.assert_close(c, n, **CLOSE)


def test_custom_autograd_with_dropout_matches_naive():
    torch.manual_seed(0)
    layer = randomize(LieraLinear(nn.Linear(12, 10), 3, 2.0, dropout=0.3), 0.3)
    x = torch.randn(3, 5, 12)
    torch.manual_seed(5)
    custom = grads(layer, x)
    layer.naive = True
    torch.manual_seed(5)
    naive = grads(layer, x)
    for c, n in zip(custom, naive):
        torch.testing.assert_close(c, n, **CLOSE)
    layer.eval()  # dropout off: the fused path gives the same function
    y = F.linear(x, layer.base_layer.weight * (1 + 2.0 * layer.lora_B @ layer.lora_A), layer.base_layer.bias)
    torch.testing.assert_close(layer(x), y, **CLOSE)


def check_gradients(w0, op, x, a, b, exact, form):
    bias = torch.randn(w0.shape[0], dtype=torch.float64)
    if form != "dora":
        plus_base = form != "liera_adapter_path"
        f = lambda x, a, b: _LieraFn.apply(x, w0, bias, a, b, None, op, 0.7, exact, plus_base)
        assert torch.autograd.gradcheck(f, (x, a, b), fast_mode=True)  # full mode: seconds for fp64 conv
        return
    mag = (torch.rand(w0.shape[0], dtype=torch.float64) + 0.5).requires_grad_(True)
    inputs = (x, a, b, mag)
    f = lambda x, a, b, m: _LieraFn.apply(x, w0, bias, a, b, m, op, 0.7, exact, True)

    def reference(x, a, b, m):  # plain autograd through the same formula, the norm detached
        sd = 0.7 * (b @ a).view(w0.shape)
        v = w0 * (sd.exp() if exact else 1 + sd)
        norm = v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1)).detach()
        return op.apply(x, m.view(norm.shape) * v / norm, bias)

    gy = torch.randn_like(f(*inputs))
    for ours, theirs in zip(
        torch.autograd.grad(f(*inputs), inputs, gy), torch.autograd.grad(reference(*inputs), inputs, gy)
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # m's gradient against finite differences (the norm does not depend on m: no detach matters there)
    assert torch.autograd.gradcheck(lambda m: f(x.detach(), a.detach(), b.detach(), m), (mag,), fast_mode=True)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("form", ["liera", "liera_adapter_path", "dora"])
def test_gradcheck_float64(exact, form):
    """The custom backward against finite differences: LieRA (whole weight, and the dropout path's update alone) and
    DoRA+LieRA (x, A, B and the magnitude m; its norm a constant, DoRA §4.3, so against a detached reference)."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(4, 3, dtype=torch.float64)
    check_gradients(
        w0, _LinearOp(), torch.randn(2, 2, 3, **d), torch.randn(2, 3, **d), torch.randn(4, 2, **d), exact, form
    )
    for groups, cin in ((1, 2), (2, 2)):  # regular and depthwise; A (r·kh, cin/g·kw), B (out·kh, r·kh), kh=3, kw=2
        w0 = torch.randn(2, cin // groups, 3, 2, dtype=torch.float64)
        op = _Conv2dOp((2, 1), (1, 0), (1, 1), groups)
        x, a, b = torch.randn(1, cin, 5, 4, **d), torch.randn(6, cin // groups * 2, **d), torch.randn(6, 6, **d)
        check_gradients(w0, op, x, a, b, exact, form)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.dw(self.conv(x)).mean((2, 3)))))


def variant(rank=2, name="lierra", **kw):
    cls = get_variant(name)
    return cls(cls.config_class(name=cls.name, **kw), rank=rank)


VARIANTS = ["lierra", "pissa_lierra", "dora_lierra"]


@pytest.mark.parametrize("name", VARIANTS)
def test_init_is_noop(name):
    torch.manual_seed(0)
    base, x = Net(), torch.randn(2, 1, 6, 6)
    model = variant(name=name).prepare(copy.deepcopy(base), ["conv", "dw", "fc"], ["head"])
    torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-7)
    if name == "lierra":
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("init", ["pissa", "loraga", "olora", "gaussian"])
def test_additive_init_refused(init):
    with pytest.raises(ConfigError, match="multiplicative") as e:
        Liera(LieraVariantConfig(name="lierra", init=init), rank=4)
    assert "default" in str(e.value) and "pissa_lierra" in str(e.value)


def test_combinations_refuse_what_they_do_not_define():
    with pytest.raises(ConfigError, match="exact_exp=true"):
        PissaLiera(PissaLieraVariantConfig(name="pissa_lierra", exact_exp=False), rank=4)
    with pytest.raises(ConfigError, match="'pissa_niter_<n>'"):
        PissaLiera(PissaLieraVariantConfig(name="pissa_lierra", init="default"), rank=4)
    with pytest.raises(ConfigError, match="dropout=0.1"):
        variant(name="dora_lierra", dropout=0.1).prepare(Net(), ["fc"], [])
    assert get_variant("pissa_liera") is PissaLiera and get_variant("dora_liera") is DoraLiera


@pytest.mark.parametrize("shape", [(10, 12), (6, 3, 3, 3), (8, 1, 7, 7)])  # linear, regular conv, depthwise
def test_pissa_lierra_init_is_the_svd_of_the_lie_algebra_coordinate(shape):
    """s·B0·A0 = the best rank-q approximation of log|W0| on the layout's matrix; W_frozen = sign(W0)·exp(residual);
    zeros stay zeros; beyond q (a depthwise kernel's 7 columns < r·kh = 14) A rows stay Kaiming, B columns zero."""
    torch.manual_seed(0)
    r, s = 2, 0.5
    groups = 8 if shape[1] == 1 else 1
    base = (
        nn.Linear(shape[1], shape[0])
        if len(shape) == 2
        else nn.Conv2d(shape[1] * groups, shape[0], shape[2], groups=groups)
    )
    with torch.no_grad():
        base.weight.view(-1)[::7] = 0.0
    w0 = base.weight.detach().clone().double()
    layer = (LieraLinear if len(shape) == 2 else LieraConv2d)(base, r, s, exact_exp=True)
    kaiming = layer.lora_A.detach().clone()
    layer.pissa_init()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    coord = w0.abs().log()
    coord[w0 == 0] = coord[w0 != 0].mean()
    matrix = coord.reshape(b.shape[0], a.shape[1])
    u, sv, vh = torch.linalg.svd(matrix, full_matrices=False)
    q = min(a.shape[0], *matrix.shape)
    best = (u[:, :q] * sv[:q]) @ vh[:q]
    torch.testing.assert_close(s * b @ a, best, rtol=1e-4, atol=1e-4)
    frozen = torch.sign(w0) * (coord - s * (b @ a).view(w0.shape)).exp()
    torch.testing.assert_close(layer.base_layer.weight.double(), frozen, rtol=1e-5, atol=1e-7)
    assert (layer.base_layer.weight[w0 == 0] == 0).all()
    assert torch.equal(layer.lora_A[q:], kaiming[q:]) and not layer.lora_B[:, q:].any()
    torch.testing.assert_close(layer.effective_weight().double(), w0, rtol=1e-5, atol=1e-7)  # starts at W0


def test_dora_lierra_closed_form():
    torch.manual_seed(0)
    for layer, x in (
        (LieraLinear(nn.Linear(12, 10), 3, 2.0, dora=True), torch.randn(4, 12)),
        (LieraConv2d(CONVS["nonsquare"](), 2, 0.5, exact_exp=True, dora=True), conv_input(CONVS["nonsquare"]())),
    ):
        c = layer.base_layer
        w0 = c.weight.detach()
        torch.testing.assert_close(layer.lora_magnitude, w0.flatten(1).norm(dim=1))  # m0 = ‖W0‖_c
        randomize(layer, 0.3)
        with torch.no_grad():
            layer.lora_magnitude.mul_(torch.rand(w0.shape[0]) + 0.5)
        sd = layer.scaling * conv_delta(layer) if w0.dim() == 4 else layer.scaling * layer.lora_B @ layer.lora_A
        v = w0 * (sd.exp() if layer.exact_exp else 1 + sd)
        norm = v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))
        weight = layer.lora_magnitude.view(norm.shape) * v / norm
        expected = torch.func.functional_call(c, {"weight": weight, "bias": c.bias}, (x,))
        torch.testing.assert_close(layer(x), expected, **CLOSE)
        torch.testing.assert_close(layer.effective_update(), weight - w0, **CLOSE)


def test_wrong_layer_type_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4))
    with pytest.raises(ConfigError, match="'1'"):
        variant().prepare(model, ["1"], [])


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_eps_policy(eps):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight[0, :3] = 0.0
        lin.weight[1, 0] = -1e-5
    zero = lin.weight == 0
    model = variant(eps=eps).prepare(nn.Sequential(lin), ["0"], [])
    layer = model[0]
    w0 = layer.base_layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(8, 6)).pow(2).sum().backward()  # one step: B ≠ 0, A is random, so B·A ≠ 0
    opt.step()
    update = layer.effective_update().detach()
    if eps is None:
        assert (w0[zero] == 0).all() and (w0 + update)[zero].eq(0).all()
    else:
        assert (w0[zero] == eps).all() and w0[1, 0] == -eps
        assert (update[zero] != 0).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_roundtrip(tmp_path, name):
    torch.manual_seed(0)
    base, x = Net(), torch.randn(2, 1, 6, 6)
    v = variant(name=name, eps=1e-4, exact_exp=True)
    model = v.prepare(copy.deepcopy(base), ["conv", "dw", "fc"], ["head"])
    for layer in liera_layers(model).values():
        randomize(layer, 0.2)
        if layer.lora_magnitude is not None:
            with torch.no_grad():
                layer.lora_magnitude.mul_(1.5)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    v.save(model, tmp_path)
    loaded = load_liera_adapter(copy.deepcopy(base), tmp_path)
    for n, layer in liera_layers(loaded).items():  # PiSSA+LieRA: the frozen weight rebuilt from W0 and B0, A0
        torch.testing.assert_close(layer.base_layer.weight, liera_layers(model)[n].base_layer.weight, rtol=0, atol=0)
    assert torch.equal(loaded(x), model(x))
    merge_liera(loaded)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    unmerge_liera(loaded)
    assert torch.equal(loaded(x), model(x))


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.BertForSequenceClassification(cfg)
    batch = dict(input_ids=torch.randint(0, 100, (2, 7)), labels=torch.tensor([0, 1]))
    return model, ["query", "value"], ["classifier", "pooler"], batch


def tiny_convnext():
    cfg = transformers.ConvNextV2Config(
        num_channels=1, image_size=8, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5
    )
    model = transformers.ConvNextV2ForImageClassification(cfg)
    batch = dict(pixel_values=torch.randn(2, 1, 8, 8), labels=torch.tensor([0, 4]))
    return model, ["dwconv", "downsampling_layer.1", "pwconv1"], ["classifier"], batch


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("build", [tiny_bert, tiny_convnext])
def test_prepare_real_models(build, name):
    torch.manual_seed(0)
    model, suffixes, heads, batch = build()
    targets = find_targets(model, suffixes, exclude=heads)
    model.eval()  # dropout off: the no-op check below compares two forwards
    reference = model(**batch).logits
    v = variant(rank=4, name=name)
    model = v.prepare(model, targets, heads)
    kinds = {type(m) for m in liera_layers(model).values()}
    assert kinds == ({LieraLinear} if build is tiny_bert else {LieraLinear, LieraConv2d})
    torch.testing.assert_close(model(**batch).logits, reference, rtol=1e-5, atol=1e-5)  # starts unchanged
    model.train()
    for pname, p in model.named_parameters():
        is_head = any(pname.startswith(h + ".") or f".{h}." in pname for h in heads)
        assert p.requires_grad == (pname.endswith(("lora_A", "lora_B", "lora_magnitude")) or is_head), pname
    deltas = v.delta_weights(model)
    assert sorted(deltas) == sorted(targets) and all(d.abs().max() < 1e-5 for d in deltas.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    opt.step()  # B ≠ 0 after one step (A is random), so every ΔW = W0 ⊙ s·B·A is non-zero
    deltas = v.delta_weights(model)
    assert sorted(deltas) == sorted(targets) and all(d.abs().sum() > 0 for d in deltas.values())


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
@pytest.mark.parametrize("kind", ["linear3d", "depthwise"])
def test_low_precision(kind, mode):
    # bf16 weights and inputs, or fp32 weights under CPU autocast: the product with x runs in bf16, like nn.Linear
    torch.manual_seed(0)
    make, make_x = LAYERS[kind]
    layer, x = randomize(make(), 0.3), make_x()
    reference = grads(copy.deepcopy(layer), x)
    results = []
    for naive in (False, True):
        m = copy.deepcopy(layer)
        m.naive = naive
        if mode == "bf16":
            m, xx = m.to(torch.bfloat16), x.to(torch.bfloat16)
            out = grads(m, xx)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = grads(m, x)
        assert out[0].dtype == torch.bfloat16
        results.append([t.float() for t in out])
    for c, n, r in zip(*results, reference):
        torch.testing.assert_close(c, n, rtol=1e-2, atol=1e-2)
        assert (c - r).norm() <= 0.02 * r.norm()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["linear3d", "depthwise"])
def test_backward_keeps_no_weight_sized_tensor(kind, form):
    """The memory-lean autograd: what the forward saves for backward is x, W0 (a parameter), A, B (and m) only —
    plain autograd also keeps the out×in adapted weight (as much as full fine-tuning), which is the check's control."""
    torch.manual_seed(0)
    make, make_x = LAYERS[kind]
    layer, x = make_form(make, form), make_x().requires_grad_(True)
    allowed = {t.data_ptr() for t in (x, layer.base_layer.weight, *layer.adapter_parameters().values())}
    for naive in (False, True):
        layer.naive = naive
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            layer(x).sum().backward()
        extra = [tuple(t.shape) for t in saved if t.data_ptr() not in allowed]
        weight_sized = [s for s in extra if math.prod(s) >= layer.base_layer.weight.numel()]
        assert bool(weight_sized) == naive, (naive, extra)
