"""Tiny paper architectures build from configs and train through the same code; the real data splits are fixed."""

import pytest
import torch

from loralab.models import build_model, build_tokenizer
from loralab.runner import check_inputs
from loralab.tasks import load_task

TEXT_MODELS = ["tiny_bert", "tiny_roberta", "tiny_deberta", "tiny_t5", "tiny_llama"]


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_tiny_text_models_train_with_lora(compose_cfg, model, tmp_path):
    cfg = compose_cfg(f"model={model}", "rank=4")
    variant, targets = check_inputs(cfg)
    tok = build_tokenizer(cfg.model)
    batch = tok(["a great day", "this is terrible, never again"], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([1, 0])
    torch.manual_seed(0)
    model_ = variant.prepare(build_model(cfg.model, cfg.task, str(tmp_path)), targets, list(cfg.model.head_modules))
    trainable = {n for n, p in model_.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    loss = model_(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model_.named_parameters() if "lora_A" in n)
    deltas = variant.delta_weights(model_)
    assert set(deltas) == set(targets)
    assert all(float(d.abs().max()) == 0 for d in deltas.values())  # B = 0 at init


def test_tweet_sentiment_split_is_fixed_and_real(compose_cfg):
    cfg = compose_cfg("model=tiny_bert")
    tok = build_tokenizer(cfg.model)
    a, b = load_task(cfg.task, tok), load_task(cfg.task, tok)
    assert a.fingerprint == b.fingerprint
    assert (
        a.sizes["test"] == 2000 and a.sizes["val"] == 1000 and a.sizes["train"] == 16703
    )  # 19,703 distinct pos/neg tweets
    labels = torch.tensor([e["labels"] for e in a.test])
    assert 0.2 < labels.float().mean() < 0.25  # 22% of the distinct pos/neg tweets are positive
    assert load_task(compose_cfg("model=tiny_bert", "task.split_seed=1").task, tok).fingerprint != a.fingerprint


def test_digits_transfer_split(compose_cfg):
    cfg = compose_cfg("experiment=digits_transfer")
    data = load_task(cfg.task, None)
    assert data.sizes == {"train": 200, "val": 100, "test": 400}
    batch = data.collate(data.train[:4])
    assert batch["pixel_values"].shape == (4, 1, 8, 8) and batch["labels"].max() < 5
