"""The `evaluate` modules in loralab.metric_modules: they load offline from their path, as a user would load them,
and give the numbers of closed forms; where the Hugging Face Hub is reachable, the same numbers as its `glue`."""

from __future__ import annotations

import math
import os
import random

import evaluate
import numpy as np
import pytest

from loralab import metric_modules
from loralab.evals.metrics import glue_metrics

TOL = 1e-12


def test_every_module_loads_offline_from_its_path():
    assert metric_modules.MODULES == ["classification", "glue", "gsm8k", "pass_at_k"]
    for name in metric_modules.MODULES:
        config = "mrpc" if name == "glue" else None
        module = evaluate.load(str(metric_modules.MODULES_DIR / name), config, keep_in_memory=True)
        assert isinstance(module, evaluate.Metric) and module.description


def test_glue_module_by_hand_and_its_configurations():
    refs, preds = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2, FN 1, FP 1, TN 1
    out = metric_modules.load("glue", "mrpc").compute(predictions=preds, references=refs)
    assert out == pytest.approx({"accuracy": 3 / 5, "f1": 2 * 2 / (2 * 2 + 1 + 1)}, abs=TOL)
    mcc = (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2)
    assert metric_modules.load("glue", "cola").compute(predictions=preds, references=refs) == pytest.approx(
        {"matthews_correlation": mcc}, abs=TOL
    )
    with pytest.raises(KeyError, match="unknown GLUE configuration 'squad'"):
        metric_modules.load("glue", "squad")
    with pytest.raises(ValueError, match="unknown metric module 'bleu'"):
        metric_modules.load("bleu")


def test_stsb_keeps_float64_inputs():
    x = [0.1 + 1e-9, 0.2, 0.30000001, 0.4, 0.9]
    y = [0.1, 0.25, 0.3, 0.41, 0.8]
    got = metric_modules.load("glue", "stsb").compute(predictions=x, references=y)["pearson"]
    assert got == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-14)


def test_pass_at_k_module_equals_the_binomial_closed_form():
    rng = random.Random(0)
    outcomes = [[rng.random() < p for _ in range(n)] for p, n in [(0.0, 5), (0.3, 10), (0.8, 7), (1.0, 5), (0.5, 20)]]
    out = metric_modules.load("pass_at_k").compute(predictions=outcomes, k=[1, 5])
    for k in (1, 5):
        exact = [1 - math.comb(len(o) - sum(o), k) / math.comb(len(o), k) for o in outcomes]
        assert out[f"pass@{k}"] == pytest.approx(sum(exact) / len(exact), abs=TOL)
    with pytest.raises(ValueError, match="pass@10 needs at least 10 samples"):
        metric_modules.load("pass_at_k").compute(predictions=outcomes, k=[10])


def test_gsm8k_module_scores_both_rules():
    refs = ["... #### 72", "... #### 1,080", "... #### 5"]
    preds = ["so #### 72", "The total is 1,080.", "no number here"]
    out = metric_modules.load("gsm8k").compute(predictions=preds, references=refs)
    # strict: first `#### <digits>`; "#### 1,080" reads 1 in the reference, so the flexible answer 1080 is needed
    assert out == {"strict_match": 1 / 3, "flexible_extract": 2 / 3, "n_no_answer": 2}


HUB = os.environ.get("HF_HUB_OFFLINE") != "1" and os.environ.get("LORALAB_HUB_TESTS") == "1"


@pytest.mark.skipif(not HUB, reason="needs the Hugging Face Hub (offline here); set LORALAB_HUB_TESTS=1 online")
@pytest.mark.parametrize("task", ["cola", "mrpc", "qqp", "sst2", "stsb"])
def test_same_numbers_as_the_hub_glue_metric(task):
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 2, 200) if task != "stsb" else rng.uniform(0, 5, 200)
    preds = np.where(rng.random(200) < 0.8, refs, 1 - refs) if task != "stsb" else refs + rng.normal(0, 1, 200)
    hub = evaluate.load("glue", task).compute(predictions=preds, references=refs)
    # the hub module rounds STS-B scores to float32 before correlating them
    assert glue_metrics(task, preds, refs) == pytest.approx(hub, rel=1e-6 if task == "stsb" else 1e-12)
