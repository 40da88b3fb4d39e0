"""`analysis_steps`: the ΔW analyses at chosen optimizer steps of one run, checked against the checkpoint of that step,
without changing the run, kept across a resume, and refused before any work when they cannot run."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TEXT
from loralab.config import ConfigError
from loralab.runner import check_inputs, run_job

pytestmark = pytest.mark.slow
SIX = [*TINY_TEXT, "logger=none", "train.max_steps=6", "train.eval_every=0", "rank=4"]


def _lora_delta_norms(checkpoint: Path, scale: float) -> dict[str, float]:
    """‖s·B·A‖_F per adapted matrix from a checkpoint's saved adapter factors (the reference)."""
    state = load_file(str(checkpoint / "model.safetensors"))
    norms = {}
    for key, A in state.items():
        if key.endswith("lora_A.default.weight"):
            B = state[key.replace("lora_A", "lora_B")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
            norms[name] = float(torch.linalg.matrix_norm(scale * B.double() @ A.double()))
    return norms


def test_step_analyses_equal_the_checkpoint_of_that_step_and_leave_the_run_unchanged(compose_cfg, tmp_path):
    cfg = compose_cfg(*SIX, "analysis_steps=[2,4]", "train.checkpoint_every=2", "train.keep_checkpoints=0")
    record = run_job(cfg)
    plain = run_job(compose_cfg(*SIX, f"paths.results_dir={tmp_path}/plain"))
    assert plain.identity == record.identity and plain.analysis_by_step == []
    assert plain.metrics == record.metrics and plain.curves == record.curves  # the analyses fork no RNG
    assert plain.analysis == record.analysis and plain.delta_fro_norms == record.delta_fro_norms

    run = Path(cfg.paths.results_dir) / record.run_dir
    assert [e["step"] for e in record.analysis_by_step] == [2, 4]
    scale = cfg.variant.alpha / cfg.rank
    for entry in record.analysis_by_step:
        assert set(entry["analysis"]) == {"spectrum", "amplification"}  # first_step looks at the init only
        reference = _lora_delta_norms(run / "checkpoints" / f"step_{entry['step']}", scale)
        assert set(reference) == set(entry["delta_fro_norms"])
        for name, value in reference.items():
            assert entry["delta_fro_norms"][name] == pytest.approx(value, rel=1e-6)
        bases = load_file(str(Path(cfg.paths.results_dir) / entry["bases"]))
        assert any(k.endswith("|A_right") for k in bases)
    # ΔW grows from step to step; the last step's analysis is the run's own
    first, second = (sum(e["delta_fro_norms"].values()) for e in record.analysis_by_step)
    assert 0 < first < second < sum(record.delta_fro_norms.values())
    final_ref = _lora_delta_norms(run / "checkpoints" / "step_6", scale)
    assert record.delta_fro_norms == pytest.approx(final_ref, rel=1e-6)


def test_a_resumed_run_keeps_the_step_analyses_before_its_checkpoint(compose_cfg):
    args = (*SIX, "analysis_steps=[2,4]", "train.checkpoint_every=2", "train.keep_checkpoints=0")
    full = run_job(compose_cfg(*args))
    run = Path(compose_cfg(*args).paths.results_dir) / full.run_dir
    # as if killed after the checkpoint of step 2: later checkpoints, step analyses and the result are gone
    for late in ("checkpoints/step_4", "checkpoints/step_6", "steps/step_4.json", "result.json"):
        path = run / late
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_job(compose_cfg(*args))
    assert resumed.resumed_from_step == 2
    assert [e["step"] for e in resumed.analysis_by_step] == [2, 4]
    for a, b in zip(resumed.analysis_by_step, full.analysis_by_step):
        assert a["delta_fro_norms"] == pytest.approx(b["delta_fro_norms"], rel=1e-6)


def test_a_fresh_start_drops_the_step_analyses_of_an_older_run(compose_cfg):
    first = run_job(compose_cfg(*SIX, "analysis_steps=[2,4]"))
    again = run_job(compose_cfg(*SIX, "analysis_steps=[3]", "overwrite=true"))
    assert again.run_dir == first.run_dir and [e["step"] for e in again.analysis_by_step] == [3]
    run = Path(compose_cfg(*SIX).paths.results_dir) / again.run_dir
    assert sorted(p.name for p in (run / "steps").glob("*.json")) == ["step_3.json"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["analysis_steps=[0,2]"], r"analysis_steps=\[0, 2\]: distinct positive"),
        (["analysis_steps=[2,2]"], r"distinct positive"),
        (["analysis_steps=[2]", "analyses=[first_step]"], r"needs an analysis of ΔW in analyses, one of \["),
    ],
)
def test_steps_that_cannot_be_analysed_fail_before_anything_runs(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_inputs(compose_cfg(*SIX, *overrides))
    assert not (tmp_path / "results").exists()


def test_steps_beyond_a_shortened_run_are_left_to_its_end(compose_cfg, caplog):
    # a preset's analysis_steps on a run shortened with train.max_steps: the end is analysed, nothing else fails
    record = run_job(compose_cfg(*SIX, "analysis_steps=[4,6,10]"))
    assert [e["step"] for e in record.analysis_by_step] == [4] and record.analysis
    assert (
        "analysis_steps [6, 10] are not below the run's 6 steps: only its end is analysed" in caplog.text
    )  # a warning
