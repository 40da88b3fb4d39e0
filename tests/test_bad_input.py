"""Bad input fails with a message naming the value and what is allowed, before weights or data are loaded."""

import re

import pytest

from conftest import TINY_TEXT, run_cli
from loralab.config import ConfigError
from loralab.runner import check_inputs
from loralab.variants import get_variant


def test_unknown_variant_name_in_code():
    with pytest.raises(ConfigError, match=r"unknown variant 'lorra'; known variants: \[") as err:
        get_variant("lorra")
    assert "'lora'" in str(err.value) and "'lierra'" in str(err.value) and "'full'" in str(err.value)


def test_rank_larger_than_the_matrix(compose_cfg):
    # tiny_bert: query/value are 32x32
    with pytest.raises(ConfigError) as err:
        check_inputs(compose_cfg("model=tiny_bert", "rank=33"))
    msg = str(err.value)
    assert "rank=33 exceeds the largest rank 32" in msg and "attention.self.query" in msg and "rank <= 32" in msg


def test_rank_equal_to_the_matrix_size_is_allowed(compose_cfg):
    _, targets = check_inputs(compose_cfg("model=tiny_bert", "rank=32"))
    assert len(targets) == 4  # 2 layers x {query, value}


def test_conv_kernel_rank_bound(compose_cfg):
    # downsampling conv of tiny_convnext: 32 x (16*2*2)=64 -> bound 32; pwconv2 is 16 x 64 -> bound 16
    with pytest.raises(ConfigError, match=r"rank=17 exceeds the largest rank 16"):
        check_inputs(compose_cfg("model=tiny_convnext", "task=digits_transfer", "rank=17"))


@pytest.mark.parametrize("variant", ["loraga", "loraga_peft"])
def test_loraga_rank_bound_is_half_the_matrix(compose_cfg, variant):
    # A0 = Vh[:r] and B0 = U[:, r:2r] need 2r singular directions: r <= 16 on tiny_bert's 32x32 matrices
    check_inputs(compose_cfg("model=tiny_bert", f"variant={variant}", "rank=16"))
    with pytest.raises(ConfigError, match=r"rank=17 exceeds the largest rank 16 .* min\(out, in\)=32"):
        check_inputs(compose_cfg("model=tiny_bert", f"variant={variant}", "rank=17"))


def test_target_modules_matching_nothing_lists_existing_layers(compose_cfg):
    with pytest.raises(ConfigError) as err:
        check_inputs(compose_cfg("model=tiny_bert", "model.target_modules=[query,valeu]"))
    msg = str(err.value)
    assert "['valeu'] match no adaptable layer" in msg
    for layer in ("attention.self.query", "attention.self.value", "attention.output.dense", "intermediate.dense"):
        assert layer in msg


def test_paper_model_on_meta_device_is_checked_without_weights(compose_cfg):
    """The 7B-class check path: the skeleton lives on the meta device, so no memory is used."""
    from loralab.models import build_skeleton

    cfg = compose_cfg("model=tiny_llama")
    skeleton = build_skeleton(cfg.model, cfg.task)
    assert all(p.is_meta for p in skeleton.parameters())


def test_missing_head_module(compose_cfg):
    with pytest.raises(ConfigError, match=r"head_modules \['clasifier'\] do not exist"):
        check_inputs(compose_cfg("model=tiny_bert", "model.head_modules=[clasifier]"))


def test_missing_local_dataset_path(compose_cfg, tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(ConfigError, match=f"data_path='{missing}'.*does not exist"):
        check_inputs(compose_cfg(f"task.data_path={missing}"))


def test_missing_package_for_model(compose_cfg):
    with pytest.raises(ConfigError, match="Python package 'not_a_pkg' is not installed"):
        check_inputs(compose_cfg("model.path=pkg://not_a_pkg/model"))


def test_dataset_with_wrong_columns(compose_cfg, tmp_path):
    from loralab.models import build_tokenizer
    from loralab.tasks import load_task

    bad = tmp_path / "tweets.csv"
    bad.write_text("label,tweet\npositive,hello\n")
    cfg = compose_cfg("model=tiny_bert", f"task.data_path={bad}")
    with pytest.raises(ConfigError, match=r"lacks columns \['sentiment', 'confidence', 'text'\]"):
        load_task(cfg.task, build_tokenizer(cfg.model))


def test_unreachable_hub_names_the_task_the_dataset_and_the_local_copy_option(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from loralab.tasks.hub import load_split

    with pytest.raises(
        ConfigError, match=r"task=glue_sst2: dataset 'nyu-mll/glue' \(sst2\) could not be loaded .* task.data_dir="
    ):
        load_split("nyu-mll/glue", "sst2", "train", task="glue_sst2")


def _bad_data_cli(tmp_path, *overrides):
    """`python run.py` with overrides only the data shows wrong: W&B on, so a started run would leave a folder."""
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return run_cli(
        *TINY_TEXT,
        "logger.system_metrics=false",
        f"logger.dir={tmp_path}/wb",
        f"paths.results_dir={tmp_path}/results",
        f"hydra.run.dir={tmp_path}/hydra",
        *overrides,
        cwd=tmp_path,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["task=glue_sst2"],
            r"task=glue_sst2: dataset 'nyu-mll/glue' \(sst2\) could not be loaded from the hub .*"
            r"without hub access pass task.data_dir=<a local copy>",
        ),
        (["task.data_path={bad}"], r"task 'tweet_sentiment': .*tweets.csv lacks columns \['sentiment', 'confidence'"),
        (["task=glue_sst2", "task.data_dir={tmp}"], r"\S+: no split 'train' \(expected a save_to_disk directory or"),
    ],
    ids=["unreachable-hub", "wrong-columns", "missing-split"],
)
def test_bad_data_at_the_command_line_exits_2_with_one_line_and_leaves_no_run(tmp_path, overrides, message):
    bad = tmp_path / "tweets.csv"
    bad.write_text("label,tweet\npositive,hello\n")
    proc = _bad_data_cli(tmp_path, *(o.format(bad=bad, tmp=tmp_path) for o in overrides))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.match(rf"loralab: error: {message}", lines[0]), proc.stderr[-3000:]
    # no result folder, no W&B run, no summary box
    assert not (tmp_path / "results").exists() and not (tmp_path / "wb").exists() and "=====" not in proc.stdout


@pytest.mark.parametrize("variant", ["loraga", "loraga_peft"])
def test_loraga_refuses_loralib_conv_layout(compose_cfg, variant):
    cfg = compose_cfg("model=tiny_convnext", "task=digits_transfer", f"variant={variant}", "rank=2")
    with pytest.raises(ConfigError, match=rf"{variant} on Conv2d targets .* needs variant.conv_layout=peft"):
        check_inputs(cfg)
    check_inputs(
        compose_cfg(
            "model=tiny_convnext", "task=digits_transfer", f"variant={variant}", "rank=2", "variant.conv_layout=peft"
        )
    )


def test_peft_conv_layout_refuses_groups_that_do_not_divide_the_rank(compose_cfg):
    with pytest.raises(ConfigError, match=r"conv_layout=peft cannot adapt grouped convolutions .* rank=3"):
        check_inputs(
            compose_cfg(
                "model=tiny_convnext",
                "task=digits_transfer",
                "variant.conv_layout=peft",
                "rank=3",
                "model.target_modules=[dwconv]",
            )
        )
