"""Every variant trains end to end through the runner on a tiny model, records ΔW and saves its weights."""

from pathlib import Path

import pytest

from conftest import TINY_TEXT
from loralab.record import Status
from loralab.runner import run_job
from loralab.variants import VARIANTS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_runs_end_to_end(compose_cfg, variant):
    cfg = compose_cfg(*TINY_TEXT, f"variant={variant}", "logger=none", "train.max_steps=6", "rank=4")
    record = run_job(cfg)
    assert record.status == Status.COMPLETED, record.error
    assert record.identity.variant == variant and Path(record.run_dir).parts[3] == variant
    assert set(record.delta_fro_norms) == set(record.adapted_layers)
    assert all(v > 0 for v in record.delta_fro_norms.values())  # every adapted matrix moved
    assert any(p.is_file() for p in (Path(cfg.paths.results_dir) / record.artifacts["weights"]).iterdir())
    if variant != "full":
        assert record.params["trainable"] < record.params["total"] / 2
    first = record.analysis["first_step"]
    assert [r["name"] for r in first] == record.adapted_layers
    for row in first:
        assert row["rel_error_best_scale"] == pytest.approx(1 - row["cosine"] ** 2)
        if variant == "full":  # full fine-tuning against itself
            assert row["cosine"] == pytest.approx(1, abs=1e-4)  # a 1e-3 step read back from fp32 weights


def test_lierra_adapts_depthwise_and_regular_convs_on_digits(compose_cfg):
    record = run_job(
        compose_cfg(
            "experiment=digits_transfer",
            "variant=lierra",
            "logger=none",
            "train.max_steps=30",
            "train.eval_every=0",
            "train.progress=false",
            "model.target_modules=[dwconv,downsampling_layer.1,pwconv1,pwconv2]",
        )
    )
    assert record.status == Status.COMPLETED, record.error
    assert any(n.endswith("dwconv") for n in record.adapted_layers)
    assert record.identity.targets == "dwconv+downsampling_layer.1+pwconv1+pwconv2"  # an unnamed set: its modules
    assert record.metrics["test/accuracy"] > 0.5
