"""Conv LoRA in loralib's layout (variants/conv_lora.py): the closed form on every kind of convolution, PEFT's own
layers where the two layouts coincide (1x1 kernels: LoRA and DoRA), PiSSA on the reshaped kernel, exact merge /
unmerge, and the adapter's round trip through PEFT's save_pretrained / from_pretrained."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Conv2d as PeftConv2d
from torch import nn

from loralab.config import ConfigError
from loralab.variants import get_variant
from loralab.variants.conv_lora import LoralibConv2d, load_lora_adapter, register_layout
from loralab.variants.lora import lora_layers

CLOSE = dict(rtol=1e-5, atol=1e-6)
CONVS = {
    "regular": lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1),
    "depthwise": lambda: nn.Conv2d(4, 4, 7, padding=3, groups=4),
    "grouped_nonsquare": lambda: nn.Conv2d(4, 6, (3, 5), padding=(1, 2), groups=2),
    "same_dilated": lambda: nn.Conv2d(3, 4, (3, 5), padding="same", dilation=2),
    "reflect": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"),
    "patchify": lambda: nn.Conv2d(3, 8, 4, stride=4),  # ConvNeXt's stem
}


def wrap(conv, r=2, alpha=4.0, **kw):
    """One conv inside a PEFT model with the loralib layout, and its adapted layer."""
    cls = get_variant(kw.pop("variant", "lora"))
    v = cls(cls.config_class(name=cls.name, alpha=alpha, **kw), r)
    model = get_peft_model(nn.Sequential(conv), v.peft_config(["0"], [], None))
    return model, model.base_model.model[0]


def randomize(layer, scale=0.3):
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, scale) if p.dim() > 1 else p.mul_(torch.rand_like(p) + 0.5)
    return layer


def x_for(conv):
    return torch.randn(2, conv.in_channels, 9, 9)


@pytest.mark.parametrize("kind", list(CONVS))
def test_forward_is_the_adapted_kernel_convolution(kind):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    base = copy.deepcopy(conv)
    x = x_for(conv)
    _, layer = wrap(conv, r=2, alpha=4.0)
    assert isinstance(layer, LoralibConv2d)
    out_c, in_g, kh, kw = conv.weight.shape
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (2 * kh, in_g * kw) and b.shape == (out_c * kh, 2 * kh)
    assert torch.equal(layer(x), base(x))  # B = 0: unchanged
    randomize(layer)
    kernel = base.weight + 2.0 * (b @ a).view(base.weight.shape)  # s = α/r = 2
    expected = torch.func.functional_call(base, {"weight": kernel, "bias": base.bias}, (x,))
    torch.testing.assert_close(layer(x), expected, **CLOSE)
    torch.testing.assert_close(layer.get_delta_weight("default"), kernel - base.weight, **CLOSE)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", ["regular", "depthwise", "grouped_nonsquare", "reflect"])
def test_merge_and_unmerge_are_exact(kind, dora):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    w0 = conv.weight.detach().clone()
    model, layer = wrap(conv, variant="dora" if dora else "lora")
    randomize(layer)
    x = x_for(conv)
    y = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, w0)
    assert torch.equal(model(x), y)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_one_by_one_kernels_match_peft(variant):
    """For a 1x1 kernel loralib's A (r x in) and B (out x r) are PEFT's 1x1 convs: same outputs and gradients (DoRA
    included: magnitude per output channel, norm detached)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 1)
    ours, layer = wrap(copy.deepcopy(conv), variant=variant)
    theirs, peft_layer = wrap(copy.deepcopy(conv), variant=variant, conv_layout="peft")
    assert isinstance(peft_layer, PeftConv2d) and not isinstance(peft_layer, LoralibConv2d)
    randomize(layer)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A["default"].weight[:, :, None, None])
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B["default"].weight[:, :, None, None])
        if variant == "dora":
            peft_m = peft_layer.lora_magnitude_vector["default"].weight  # PEFT: (1, out, 1, 1)
            peft_m.copy_(layer.lora_magnitude_vector["default"].weight.view(peft_m.shape))
    x = x_for(conv)
    y1, y2 = ours(x), theirs(x)
    torch.testing.assert_close(y1, y2, **CLOSE)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    for name in ("lora_A", "lora_B"):
        ga = getattr(layer, name)["default"].weight.grad
        gb = getattr(peft_layer, name)["default"].weight.grad.flatten(1)
        torch.testing.assert_close(ga, gb, **CLOSE)
    if variant == "dora":
        torch.testing.assert_close(
            layer.lora_magnitude_vector["default"].weight.grad,
            peft_layer.lora_magnitude_vector["default"].weight.grad.flatten(),
            **CLOSE,
        )


def test_dora_closed_form_on_a_depthwise_kernel():
    torch.manual_seed(0)
    conv = CONVS["depthwise"]()
    base = copy.deepcopy(conv)
    _, layer = wrap(conv, variant="dora")
    m = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m, base.weight.flatten(1).norm(dim=1))  # ‖W0‖ per output channel
    randomize(layer)
    v = base.weight + layer.get_delta_weight("default")
    kernel = m.view(-1, 1, 1, 1) * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x = x_for(conv)
    torch.testing.assert_close(layer(x), F.conv2d(x, kernel, base.bias, 1, 3, 1, 4), **CLOSE)


@pytest.mark.parametrize("kind", ["regular", "depthwise", "patchify"])
def test_pissa_on_the_reshaped_kernel(kind):
    """s·B0·A0 = the top-q SVD of W0.view(out·kh, in/g·kw), q = min(r·kh, rank); frozen weight W0 − s·B0·A0."""
    torch.manual_seed(0)
    conv = CONVS[kind]()
    base = copy.deepcopy(conv)
    x = x_for(conv)
    _, layer = wrap(conv, variant="pissa", r=2, alpha=4.0)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    w0 = base.weight.detach().double()
    matrix = w0.reshape(b.shape[0], a.shape[1])
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    q = min(a.shape[0], *matrix.shape)
    principal = (u[:, :q] * s[:q]) @ vh[:q]
    torch.testing.assert_close(2.0 * b @ a, principal, rtol=1e-5, atol=1e-6)
    frozen = layer.get_base_layer().weight.double()
    torch.testing.assert_close(frozen, w0 - principal.view(w0.shape), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), base(x), **CLOSE)  # starts unchanged
    if q < a.shape[0]:  # a depthwise kernel has kw = 7 columns < r·kh = 14: the rest starts as LoRA's
        assert not b[:, q:].any() and a[q:].abs().sum() > 0
    pissa_dora = LoraConfig(r=2, lora_alpha=4.0, target_modules=["0"], init_lora_weights="pissa", use_dora=True)
    both = get_peft_model(nn.Sequential(copy.deepcopy(base)), register_layout(pissa_dora, "loralib"))
    torch.testing.assert_close(both(x), base(x), **CLOSE)  # PiSSA and DoRA together also start unchanged


def test_dropout_only_on_the_adapter_path():
    torch.manual_seed(0)
    conv = CONVS["regular"]()
    base = copy.deepcopy(conv)
    model, layer = wrap(conv, dropout=0.5)
    randomize(layer)
    x = x_for(conv)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5)
    expected = base(x) + F.conv2d(dropped, layer.get_delta_weight("default"), None, 2, 1)
    torch.testing.assert_close(y, expected, **CLOSE)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, pixel_values):
        return self.head(torch.relu(self.fc(self.dw(self.stem(pixel_values)).mean((2, 3)))))


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa"])
def test_adapter_round_trip_through_peft(tmp_path, variant):
    """Lora.save writes PEFT's adapter (+ the layout); load_lora_adapter = PeftModel.from_pretrained with the layout
    re-registered. PiSSA's saved factors belong to its residual base, so it round-trips on the residual model."""
    torch.manual_seed(0)
    base = Net()
    cls = get_variant(variant)
    v = cls(cls.config_class(name=variant), 2)
    model = v.prepare(copy.deepcopy(base), ["stem", "dw", "fc"], ["head"])
    assert {type(m) for m in lora_layers(model).values()} >= {LoralibConv2d}
    for layer in lora_layers(model).values():
        randomize(layer, 0.1)
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    v.save(model, tmp_path)
    start = copy.deepcopy(base)
    if variant == "pissa":  # the residual weights PiSSA left in the base model
        for name, layer in lora_layers(model).items():
            start.get_submodule(name).weight.data.copy_(layer.get_base_layer().weight)
    loaded = load_lora_adapter(start, tmp_path)
    assert {type(m) for m in lora_layers(loaded).values()} >= {LoralibConv2d}
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=1e-6)


def test_layout_choice_and_bad_value():
    with pytest.raises(ConfigError, match="conv_layout='kernel'.*loralib"):
        get_variant("lora")(get_variant("lora").config_class(name="lora", conv_layout="kernel"), 4)
    # PEFT's own layout cannot adapt a depthwise conv at r=8: why loralib's is the default
    with pytest.raises(ValueError, match="rank is divisible by groups"):
        wrap(nn.Conv2d(16, 16, 7, padding=3, groups=16), r=8, conv_layout="peft")
    _, layer = wrap(nn.Conv2d(16, 16, 7, padding=3, groups=16), r=8)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 8 * 49 * (16 + 1)  # r·k²·(in/g + out)


def test_meta_device_counts_like_a_real_model():
    """The budget tests build ConvNeXt-V2-B on the meta device: the layer must build there with the same shapes."""
    with torch.device("meta"):
        conv = nn.Conv2d(32, 32, 7, padding=3, groups=32)
    _, layer = wrap(conv, r=8, variant="dora")
    counts = {n: p.numel() for n, p in layer.named_parameters() if p.requires_grad}
    assert sum(counts.values()) == 8 * 49 * 33 + 32
