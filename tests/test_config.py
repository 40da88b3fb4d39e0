"""Every config group composes into the typed schema; typos and wrong types fail at composition."""

import json
import pickle

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF
from loralab.config import (
    CHOICES,
    DEFAULT_ANALYSES,
    ConfigError,
    LoggerConfig,
    ModelConfig,
    Scheduler,
    TaskConfig,
    VariantConfig,
    validate,
)
from loralab.variants import ALIASES, VARIANTS

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
VARIANT_FILES = sorted(p.stem for p in (CONF / "variant").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (CONF / "logger").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_groups_are_not_empty():
    assert {
        "minilm",
        "convnext_digits",
        "tiny_t5",
        "tiny_llama",
        "tiny_roberta",
        "tiny_deberta",
        "tiny_convnext",
    } <= set(MODELS)
    assert {"tweet_sentiment", "digits_transfer"} <= set(TASKS)
    assert set(VARIANT_FILES) == set(VARIANTS) | set(ALIASES)
    assert {
        "lora",
        "full",
        "loraga",
        "loraga_peft",
        "lierra",
        "pissa",
        "dora",
        "rslora",
        "lora_plus",
        "adalora",
    } <= set(VARIANTS)
    assert set(LOGGERS) == {"wandb", "none"}


def test_default_config(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.task.name, cfg.variant.name, cfg.rank, cfg.logger.name) == (
        "minilm",
        "tweet_sentiment",
        "lora",
        8,
        "wandb",
    )
    assert cfg.logger.mode == "offline"
    assert cfg.train.lr == cfg.variant.lr == 5e-4
    validate(cfg)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_typed(compose_cfg, model):
    cfg = compose_cfg(f"model={model}")
    assert issubclass(OmegaConf.get_type(cfg.model), ModelConfig)
    assert cfg.model.name == model
    task = "digits_transfer" if cfg.model.modality == "image" else "tweet_sentiment"
    validate(compose_cfg(f"model={model}", f"task={task}"))


@pytest.mark.parametrize("task", TASKS)
def test_every_task_composes_typed(compose_cfg, task):
    cfg = compose_cfg(f"task={task}")
    assert issubclass(OmegaConf.get_type(cfg.task), TaskConfig) and cfg.task.name == task


@pytest.mark.parametrize("variant", VARIANT_FILES)
def test_every_variant_composes_with_its_schema(compose_cfg, variant):
    cfg = compose_cfg(f"variant={variant}")
    assert OmegaConf.get_type(cfg.variant) is VARIANTS[ALIASES.get(variant, variant)].config_class
    assert issubclass(OmegaConf.get_type(cfg.variant), VariantConfig)
    assert cfg.train.lr == cfg.variant.lr
    # spawned DDP/FSDP workers receive the config by pickle: every Enum in it must be found by module.name
    assert pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize("logger", LOGGERS)
def test_every_logger_composes(compose_cfg, logger):
    assert issubclass(OmegaConf.get_type(compose_cfg(f"logger={logger}").logger), LoggerConfig)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    assert cfg.experiment_name == experiment
    validate(cfg)


def test_user_lr_overrides_variant_default(compose_cfg):
    assert compose_cfg("variant=full").train.lr == 5e-5
    assert compose_cfg("variant=full", "train.lr=1e-3").train.lr == 1e-3


def test_unknown_variant_lists_the_options(compose_cfg):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg("variant=lorra")
    assert "lorra" in str(err.value) and "lora" in str(err.value) and "full" in str(err.value)


@pytest.mark.parametrize("group", ["model", "task"])
def test_unknown_model_or_task_lists_the_options(compose_cfg, group):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(f"{group}=nope")
    assert "nope" in str(err.value) and ("minilm" in str(err.value) or "tweet_sentiment" in str(err.value))


def test_typo_in_a_key_fails_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("variant.alpah=8")
    assert "alpah" in str(err.value.__cause__ or err.value)


def test_wrong_type_fails_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("rank=eight")
    assert isinstance(err.value.__cause__, (ValidationError, ConfigKeyError))


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_field_rejects_unknown_values_at_composition(compose_cfg, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(f"{key}=bogus")
    msg = str(err.value.__cause__)
    assert "Invalid value 'bogus'" in msg and f"full_key: {key}" in msg
    assert all(member.value in msg for member in CHOICES[key])  # the message lists what is allowed


def test_choice_values_compare_print_and_serialise_as_strings(compose_cfg):
    cfg = compose_cfg("train.precision=bf16", "train.scheduler=cosine")
    precision = cfg.train.precision
    assert precision == "bf16" and f"{precision}" == str(precision) == "bf16" and json.dumps(precision) == '"bf16"'
    assert {"bf16": 1}[precision] == 1 and cfg.train.scheduler in ("linear", "cosine")


def test_scheduler_choices_are_transformers_schedulers():
    from transformers import SchedulerType

    assert [s.value for s in Scheduler] == [s.value for s in SchedulerType] + ["multistep"]


@pytest.mark.parametrize("rank", [0, -3])
def test_non_positive_rank(compose_cfg, rank):
    with pytest.raises(ConfigError, match=f"rank={rank} must be a positive integer"):
        validate(compose_cfg(f"rank={rank}"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_device_without_cuda_is_refused_not_run_on_the_cpu(compose_cfg):
    with pytest.raises(ConfigError, match=r"train.device=cuda but torch .* sees no CUDA device: use train.device=auto"):
        validate(compose_cfg("train.device=cuda"))
    validate(compose_cfg("train.device=cpu"))


def test_model_task_modality_mismatch(compose_cfg):
    with pytest.raises(ConfigError, match="needs a image model, but model 'minilm' is a text model"):
        validate(compose_cfg("task=digits_transfer"))


def test_analyses_are_a_list_of_known_names(compose_cfg):
    from loralab.analysis.per_run import ANALYSES

    assert compose_cfg().analyses == list(DEFAULT_ANALYSES) and set(DEFAULT_ANALYSES) <= set(ANALYSES)
    validate(compose_cfg("analyses=[]"))
    validate(compose_cfg("analyses=[first_step,spectrum]"))
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("analyses=[spectrum,bogus]"))
    assert "analyses=['spectrum', 'bogus']" in str(err.value) and all(a in str(err.value) for a in ANALYSES)
    with pytest.raises(ConfigError, match="each at most once"):
        validate(compose_cfg("analyses=[spectrum,spectrum]"))


def test_the_old_analyze_switch_is_gone(compose_cfg):
    """`analyze=false` became `analyses=[]`; the old key fails at composition instead of being ignored."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("analyze=false")
    assert "analyze" in str(err.value.__cause__ or err.value)


def test_variant_schemas_are_the_variants_config_classes():
    from loralab.variant_configs import VARIANT_CONFIGS

    assert VARIANT_CONFIGS == {name: cls.config_class for name, cls in VARIANTS.items()}


def test_composing_a_config_imports_neither_torch_nor_peft():
    """`--help` and tab completion compose the config: the schemas must not pull in torch (seconds to import)."""
    import subprocess
    import sys

    code = (
        "import sys; from loralab.config import register_configs; register_configs(); "
        "import loralab.cli_help; print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
