"""LoRA-GA presets against the official protocol (issue 14): the README protocol tables checked against the
composed configs, AdaLoRA's static and reallocating schedules (also under DDP), the first-N gradient sample, T5
target padding."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from conftest import TINY_TEXT
from loralab import fixtures
from loralab.config import ConfigError
from loralab.gradients import estimate_gradients
from loralab.models import build_model, build_tokenizer
from loralab.record import Status
from loralab.runner import Job, check_inputs, prepare, run_job
from loralab.tasks import load_task
from loralab.train import make_accelerator
from loralab.variants import PrepareContext
from loralab.variants.lora import lora_layers
from loralab.variants.peft_baselines import AdaLora, AdaLoraVariantConfig

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = ["+model.config.hidden_dropout_prob=0.0", "+model.config.attention_probs_dropout_prob=0.0"]

# ---------------------------------------------------------------- protocol tables vs the composed config


def protocol_rows(readme: Path) -> dict[str, dict[str, str]]:
    """The README's protocol table: setting -> {column: cell}."""
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| setting | loralab |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _compose_values(compose, preset: str, task: str | None = None, variant: str | None = None) -> dict:
    overrides = (
        [f"experiment={preset}"] + ([f"task={task}"] if task else []) + ([f"variant={variant}"] if variant else [])
    )
    return compose(*overrides)


def _shared_values(compose, preset: str) -> tuple[dict[str, str], object]:
    """The rows both LoRA-GA presets have, from the composed config (and its sweep); returns them and the config."""
    cfg, sweep = _compose_values(compose, preset), cfg_sweep(compose, preset)
    per_variant = {v: _compose_values(compose, preset, variant=v) for v in sweep["variant"].split(",")}
    loraga, adalora = cfg.variant, per_variant["adalora_static"].variant
    return {
        "model": cfg.model.path,
        "targets": ", ".join(cfg.model.target_sets[cfg.targets]),
        "α": f"{loraga.alpha:g}",
        "scaling (LoRA-GA)": "rsLoRA α/√r" if loraga.use_rslora else "α/r",
        "lr per variant": ", ".join(sorted({f"{c.train.lr:g}" for c in per_variant.values()})),
        "batch": f"{cfg.train.batch_size} x {cfg.train.grad_accum}",
        "epochs / steps": f"{cfg.train.epochs:g} epoch",
        "warmup": f"{cfg.train.warmup_ratio:g}",
        "schedule": cfg.train.scheduler,
        "weight decay": f"{cfg.train.weight_decay:g}",
        "LoRA-GA gradient sample": f"{loraga.grad_sample} {loraga.grad_batches} x {loraga.grad_batch_size}",
        "AdaLoRA": f"{adalora.schedule}, init_r {math.ceil(adalora.init_rank_ratio * 8)}",  # at r=8
        "variants": sweep["variant"],
    }, cfg


def _glue_t5_values(compose) -> dict[str, str]:
    shared, cfg = _shared_values(compose, "loraga_glue_t5")
    loraga = cfg.variant
    tasks = [_compose_values(compose, "loraga_glue_t5", task=f"glue_{t}").task for t in ("mnli", "sst2")]
    return shared | {
        "rank": str(cfg.rank),
        "precision": {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision],
        "max length": str(cfg.task.max_length),
        "target padding": cfg.task.target_padding,
        "LoRA-GA init": f"{loraga.direction}, {loraga.scale} γ={loraga.stable_gamma:g}",
        "validation & checkpoint selection": f"n_val {cfg.task.n_val}, final model",
        "metric": f"{cfg.task.label_scoring} label-word accuracy",
        "data": f"{tasks[0].train_split} ({'all rows' if tasks[0].n_train is None else tasks[0].n_train}) -> "
        f"{tasks[0].test_split}, {tasks[1].test_split}",
        "seeds": cfg_sweep(compose, "loraga_glue_t5")["seed"],
    }


def cfg_sweep(compose, preset: str) -> dict[str, str]:
    """The preset's sweep (hydra.sweeper.params)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from loralab.smoke import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    return {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}


def _llama_values(compose) -> dict[str, str]:
    shared, cfg = _shared_values(compose, "loraga_llama")
    gsm = cfg.task
    code = _compose_values(compose, "loraga_llama", task="codefeedback_humaneval").task
    chat = _compose_values(compose, "loraga_llama", task="wizardlm_mtbench").task
    return shared | {
        "rank": cfg_sweep(compose, "loraga_llama")["rank"],
        "precision": f"{cfg.model.dtype} + {cfg.train.precision}",
        "max length": f"{gsm.max_length}, {code.max_length}, {chat.max_length}",
        "data filtering": f"n_train {gsm.n_train}, {code.n_train}, {chat.n_train}",
        "validation & checkpoint selection": f"n_val {gsm.n_val}, final model",
        "decoding GSM8K": "greedy" if not gsm.generation.do_sample else "sampled",
        "decoding MT-bench": "greedy" if not chat.generation.do_sample else "sampled",
        "decoding HumanEval": (
            f"T={code.generation.temperature:g}, top-p {code.generation.top_p:g}, {code.generation.num_samples} samples"
        ),
        "max new tokens": f"{gsm.generation.max_new_tokens}, {code.generation.max_new_tokens}, "
        f"{chat.generation.max_new_tokens}",
        "metric GSM8K": f"{gsm.gsm8k_headline} (headline)",
        "metric HumanEval": f"pass@1, {code.code_extraction} post-processing, {code.sandbox_timeout_s:g} s",
        "metric MT-bench": f"judge {chat.judge.model}, both turns",
        "seeds": str(cfg.seed),
    }


@pytest.mark.parametrize(("preset", "values"), [("loraga_glue_t5", _glue_t5_values), ("loraga_llama", _llama_values)])
def test_protocol_table_matches_the_composed_config(preset, values, compose_cfg):
    rows = protocol_rows(ROOT / "experiments" / preset / "README.md")
    expected = values(compose_cfg)
    assert set(expected) <= set(rows), sorted(set(expected) - set(rows))
    for setting, value in expected.items():
        cell = rows[setting]["loralab"].strip("`")
        assert cell == value, f"{preset} README, {setting!r}: table says {cell!r}, the composed config {value!r}"
    for setting, row in rows.items():  # every row says where the official value comes from
        assert row["source"] and row["official value"], setting


# ---------------------------------------------------------------- AdaLoRA: static vs reallocating ranks


def _adalora_model(schedule: str, total_steps: int = 12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    cfg = AdaLoraVariantConfig(name="adalora", schedule=schedule, delta_t=1, alpha=16.0)
    variant = AdaLora(cfg, rank=2)
    model = variant.prepare(model, ["0", "2", "4"], [], PrepareContext(total_steps=total_steps))
    return variant, model


def _nonzero_ranks(model) -> dict[str, int]:
    return {n: int((p != 0).sum()) for n, p in model.named_parameters() if n.endswith("lora_E.default")}


def _train(variant, model, wrapped=None, steps: int = 12, seed: int = 0):
    net = wrapped if wrapped is not None else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        variant.after_optimizer_step(net, step)  # as train.py: after the step, before the gradients are cleared
        opt.zero_grad(set_to_none=True)


def test_adalora_static_keeps_its_ranks_and_reallocate_prunes_to_budget():
    static, model = _adalora_model("static")
    assert set(_nonzero_ranks(model).values()) == {0}  # AdaLoRA's E starts at zero: ranks show once trained
    _train(static, model)
    init_r = 3  # ceil(1.5 * 2)
    assert set(_nonzero_ranks(model).values()) == {init_r}  # every singular value trained, none masked
    assert model.peft_config["default"].rank_pattern is None  # the allocator never ran

    moving, model = _adalora_model("reallocate")
    _train(moving, model)
    ranks = _nonzero_ranks(model)
    budget = 2 * len(ranks)  # target_r per layer on average
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(sum(mask) for mask in pattern.values()) == budget
    assert sum(ranks.values()) == budget < init_r * len(ranks)
    with pytest.raises(ConfigError, match="variant.schedule='sometimes'"):
        AdaLora(AdaLoraVariantConfig(name="adalora", schedule="sometimes"), rank=2)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        variant, model = _adalora_model("reallocate")
        ddp = nn.parallel.DistributedDataParallel(model)
        _train(variant, model, wrapped=ddp, seed=rank)  # each process its own data; gradients all-reduced
        pattern = model.peft_config["default"].rank_pattern
        gathered = [None] * world
        dist.all_gather_object(gathered, {k: list(v) for k, v in pattern.items()})
        if rank == 0:
            same = all(g == gathered[0] for g in gathered)
            kept = sum(sum(mask) for mask in gathered[0].values())
            Path(out_dir, "result.txt").write_text(f"{same} {kept} {len(gathered[0])}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_adalora_reallocates_under_ddp_on_the_unwrapped_model(tmp_path):
    """Two gloo processes: update_and_allocate reaches the PEFT model through the DDP wrapper, and every process
    masks the same ranks (their allocator scores all-reduced gradients)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    same, kept, layers = (tmp_path / "result.txt").read_text().split()
    assert same == "True" and int(kept) == 2 * int(layers)


# ---------------------------------------------------------------- LoRA-GA's gradient sample


def _runner_job(compose_cfg, tmp_path, seed: int, sample: str, cache: Path) -> Job:
    cfg = compose_cfg(
        "model=tiny_bert",
        "task=glue_mrpc",
        f"task.data_dir={fixtures.glue(tmp_path, 'mrpc')}",
        "task.max_length=32",
        "variant=loraga",
        "rank=2",
        f"seed={seed}",
        f"variant.grad_sample={sample}",
        f"variant.grad_cache={cache}",
        "train.device=cpu",
        *NO_DROPOUT,
    )
    variant, targets = check_inputs(cfg)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)  # the same pretrained-stand-in weights for every seed: only the sample may differ
    model = build_model(cfg.model, cfg.task, str(tmp_path))
    return Job(
        cfg=cfg,
        record=SimpleNamespace(),
        out=tmp_path,
        root=tmp_path,
        variant=variant,
        targets=targets,
        analyses=[],
        accelerator=make_accelerator(cfg.train),
        data=data,
        model=model,
    )


def test_gradient_sample_is_the_first_rows_in_file_order_for_every_seed(compose_cfg, tmp_path):
    """The runner's context (stage `prepare`) hands LoRA-GA the first grad_batches × grad_batch_size training rows
    in file order whatever the seed (official: select(range(bsz * iters))); `shuffled` draws them by the seed."""
    grads = {}
    for seed in (0, 1):
        for sample in ("first", "shuffled"):
            cache = tmp_path / f"{sample}{seed}.safetensors"
            job = _runner_job(compose_cfg, tmp_path, seed, sample, cache)
            if (seed, sample) == (0, "first"):
                # the harness's first training rows are the file's first rows (GLUE: no holdout, no subset)
                lines = (Path(job.cfg.task.data_dir) / "train.jsonl").read_text().splitlines()
                tokenizer = build_tokenizer(job.cfg.model)
                for i, line in enumerate(lines[: job.cfg.variant.grad_batches]):
                    row = json.loads(line)
                    encoded = tokenizer(row["sentence1"], row["sentence2"], truncation=True, max_length=32)
                    assert job.data.train[i]["input_ids"] == encoded["input_ids"]
                fresh = build_model(job.cfg.model, job.cfg.task, str(tmp_path))
                fresh.load_state_dict(job.model.state_dict())
                n = job.cfg.variant.grad_batches * job.cfg.variant.grad_batch_size
                first_rows = (job.data.collate(job.data.train[i : i + 1]) for i in range(n))
                expected = estimate_gradients(fresh, job.targets, first_rows, n)
            prepare(job)
            grads[seed, sample] = load_file(str(cache))
    for name, grad in expected.items():
        assert torch.equal(grads[0, "first"][name], grad), name  # the first N rows of the file
        assert torch.equal(grads[1, "first"][name], grad), name  # the same rows for another seed
    assert any(not torch.equal(grads[0, "shuffled"][k], grads[1, "shuffled"][k]) for k in expected)
    assert any(not torch.equal(grads[0, "shuffled"][k], expected[k]) for k in expected)


@pytest.mark.parametrize("variant", ["loraga", "loraga_peft"])
def test_bad_gradient_sample_is_refused(variant, compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(f"variant={variant}", "variant.grad_sample=random")
    assert "Invalid value 'random', expected one of [first, shuffled]" in str(err.value.__cause__)


# ---------------------------------------------------------------- T5 target padding


@pytest.mark.parametrize("padding", ["train", "ignore"])
def test_t5_target_padding(padding, compose_cfg, tmp_path):
    """train (official SeqToSeqEncode): padded target positions keep the pad id, so the loss covers them, and the
    target mask goes to the decoder; ignore: -100 there, no decoder mask."""
    data_dir = fixtures.glue(tmp_path, "mnli")
    cfg = compose_cfg(
        "model=tiny_t5", "task=glue_mnli", "task.kind=text2text", f"task.data_dir={data_dir}",
        f"task.target_padding={padding}",
    )  # fmt: skip
    tokenizer = build_tokenizer(cfg.model)
    data = load_task(cfg.task, tokenizer)
    lengths = {len(e["labels"]) for e in data.train}
    assert len(lengths) > 1  # MNLI's label words differ in length: a batch of all three pads two
    examples = sorted(data.train, key=lambda e: len(e["labels"]))[:: max(1, len(data.train) // 6)][:6]
    batch = data.collate(examples)
    longest = max(len(e["labels"]) for e in examples)
    for row, e in enumerate(examples):
        real = len(e["labels"])
        assert batch["labels"][row, :real].tolist() == e["labels"]
        pad = batch["labels"][row, real:longest].tolist()
        if padding == "train":
            assert pad == [tokenizer.pad_token_id] * (longest - real)
            assert batch["decoder_attention_mask"][row].tolist() == [1] * real + [0] * (longest - real)
        else:
            assert pad == [-100] * (longest - real) and "decoder_attention_mask" not in batch
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, str(tmp_path)).eval()
    with torch.no_grad():
        out = model(**batch)
    logp = torch.log_softmax(out.logits.float(), -1)
    counted = batch["labels"] != -100
    by_hand = -logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[counted].mean()
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert int(counted.sum()) == (
        len(examples) * longest if padding == "train" else sum(len(e["labels"]) for e in examples)
    )


def test_bad_target_padding_is_refused_at_composition(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("experiment=loraga_glue_t5", "task.target_padding=sometimes")
    assert "Invalid value 'sometimes', expected one of [train, ignore]" in str(err.value.__cause__)


def test_loraga_adapters_stay_fp32_beside_a_bf16_base(compose_cfg, tmp_path):
    """Llama runs in bf16: the official init casts A0, B0 to fp32 (init dtype fp32), as PEFT keeps every adapter
    beside a bf16 base; only the frozen W0 − s·B0·A0 is bf16. The init stays a no-op up to bf16 rounding."""
    cfg = compose_cfg("model=tiny_bert", "variant=loraga", "rank=2", "task.n_train=16", "task.n_test=8", *NO_DROPOUT)
    variant, targets = check_inputs(cfg)
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, str(tmp_path)).to(torch.bfloat16).eval()
    batch = data.collate(data.test)
    with torch.no_grad():
        before = model(**batch).logits.float()
    batches = lambda size: iter([data.collate(data.train[:4])] * 8)
    ctx = PrepareContext(train_batches=batches, first_batches=batches)
    model = variant.prepare(model, targets, list(cfg.model.head_modules), ctx).eval()
    layers = dict(lora_layers(model))
    assert len(layers) == len(targets)
    for layer in layers.values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == torch.float32
    with torch.no_grad():
        after = model(**batch).logits.float()
    assert (after - before).abs().max().item() <= 2e-2 * before.abs().max().item()  # bf16 has 8 bits of mantissa


def test_adalora_static_trains_through_the_runner_as_its_own_run(compose_cfg):
    """`variant=adalora_static` is AdaLoRA (the class, the results' variant name) with schedule=static in the
    run's identity, so it never shares a run with the reallocating `variant=adalora`."""
    runs = {}
    for name in ("adalora_static", "adalora"):
        cfg = compose_cfg(*TINY_TEXT, f"variant={name}", "logger=none", "train.max_steps=4", "rank=4", "analyses=[]")
        runs[name] = run_job(cfg)
        assert runs[name].status == Status.COMPLETED, runs[name].error
    static, moving = runs["adalora_static"].identity, runs["adalora"].identity
    assert static.variant == moving.variant == "adalora" and static.hparams["variant.schedule"] == "static"
    assert "variant.schedule" not in moving.hparams and static.key != moving.key


def test_every_benchmark_prompt_ends_with_the_official_extra_space(compose_cfg, tmp_path):
    """Their model_inference tokenizes `input_text + " "`: the training text x + " " + y starts the same way."""
    from loralab.tasks.instruct import benchmark_items

    cfg = compose_cfg(
        "experiment=loraga_llama",
        "task.eval_sets=[gsm8k,humaneval,mtbench]",
        f"+task.eval_data.gsm8k={fixtures.gsm8k(tmp_path)}",
        f"+task.eval_data.humaneval={fixtures.humaneval(tmp_path)}",
        f"+task.eval_data.mtbench={fixtures.mtbench(tmp_path)}",
    )
    items = benchmark_items(cfg.task)
    ends = {"gsm8k": "\nA:  ", "humaneval": "### Response:\n```python\n ", "mtbench": "### Response:\n "}
    assert {it["set"] for it in items} == set(ends)
    for it in items:
        assert it["prompt"].endswith(ends[it["set"]]), (it["set"], it["prompt"][-40:])
