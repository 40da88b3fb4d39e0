"""Instruction tuning of a causal LM, evaluated by generation on benchmarks (LoRA-GA's Llama-2 runs, LieRA's
commonsense runs).

Training data follow the official LoRA-GA code (`reproduce/data.py`): rows of the hub dataset are taken in file
order (their `dataset.shuffle(seed=42)` result is discarded, so no shuffle happens), mapped to (prompt x,
response y), filtered, and the first `n_train` kept rows train while the next `n_val` form the validation set
(validation loss only); the model sees x + " " + y + EOS with the loss on the response tokens only.

The test split is the benchmarks in `task.eval_sets`, all by batched generation with a KV cache (greedy unless
`task.generation.do_sample`): GSM8K accuracy, HumanEval pass@k (programs run only in `evals.sandbox`), MT-bench
answers (first turn always; both turns, judged, only with `task.judge.endpoint`; otherwise "not judged"), and the eight
commonsense tasks (LLM-Adapters' answer extraction).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loralab.config import ConfigError, GenerationConfig, TaskConfig
from loralab.evals import commonsense, gsm8k, humaneval, mtbench
from loralab.models import resolve_path
from loralab.tasks.base import EvalContext, TaskData, by_length, fingerprint
from loralab.tasks.hub import load_split, require_columns

# Alpaca's no-input template, as LoRA-GA uses it for Code-Feedback and WizardLM
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def first_code_block(answer: str) -> str:
    """Everything up to the end of the first ``` block (LoRA-GA keeps only that of a Code-Feedback answer)."""
    return "```".join(answer.split("```")[:2]) + "```"


# format -> (columns it needs, keep(row), row -> (prompt, response))
FORMATS: dict[str, tuple[list[str], Callable[[dict], bool], Callable[[dict], tuple[str, str]]]] = {
    "metamath": (
        ["query", "response", "type"],
        lambda r: "GSM" in r["type"],
        lambda r: (gsm8k.prompt(r["query"]), gsm8k.metamath_target(r["response"])),
    ),
    "codefeedback": (
        ["query", "answer"],
        lambda r: "```" in r["answer"],
        lambda r: (ALPACA.format(instruction=r["query"]), first_code_block(r["answer"])),
    ),
    "wizardlm": (
        ["instruction", "output"],
        lambda r: "sorry" not in r["output"].lower() and "as an ai" not in r["output"].lower(),
        lambda r: (ALPACA.format(instruction=r["instruction"]), r["output"]),
    ),
    # LLM-Adapters' finetune.py template with its literal whitespace (the official default) / the clean Alpaca one
    "commonsense": (
        ["instruction", "output"],
        lambda r: True,
        lambda r: (commonsense.train_prompt(r["instruction"], verbatim=True), r["output"]),
    ),
    "commonsense_alpaca": (
        ["instruction", "output"],
        lambda r: True,
        lambda r: (commonsense.train_prompt(r["instruction"]), r["output"]),
    ),
}
# formats encoded as LLM-Adapters' finetune.py `tokenize` does: the template ends where the response begins (no " "
# between them, as LoRA-GA writes), and EOS is appended as a token id only where the cut text leaves room
LLM_ADAPTERS_FORMATS = ("commonsense", "commonsense_alpaca")
EVAL_SETS = ("gsm8k", "humaneval", "mtbench", *commonsense.COMMONSENSE_TASKS)
DEFAULT_EVAL_DATA = {  # benchmark -> hub id (task.eval_data.<name>=<hub id or local path> overrides)
    "gsm8k": "openai/gsm8k",
    "humaneval": "openai/openai_humaneval",
    "mtbench": "HuggingFaceH4/mt_bench_prompts",
    # the commonsense test sets are LLM-Adapters' files (dataset/<name>/test.json in their GitHub repository):
    # task.eval_data.commonsense=<that dataset directory>
}


def check_instruct(cfg: TaskConfig) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(f"task {cfg.name!r}: format={cfg.format!r}; choose one of {sorted(FORMATS)}")
    unknown = [s for s in cfg.eval_sets if s not in EVAL_SETS]
    if unknown:
        raise ConfigError(f"task {cfg.name!r}: unknown eval_sets {unknown}; known: {list(EVAL_SETS)}")


def sft_pairs(cfg: TaskConfig, tokenizer) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) (prompt, response) pairs. `val_rows=after_train` (LoRA-GA): kept rows in file order, the first
    n_train train and the next n_val validate; with `long_rows=drop` only pairs shorter than max_length tokens are
    kept. `val_rows=random` (LLM-Adapters): `train_test_split(test_size=n_val, shuffle=True, seed=split_seed)` of
    all rows, as their finetune.py draws its validation set; the first n_train of the rest train."""
    columns, keep, to_pair = FORMATS[cfg.format]
    rows = load_split(cfg.dataset, cfg.subset, cfg.train_split, cfg.data_dir, task=cfg.name)
    require_columns(rows, columns, f"task {cfg.name!r} ({cfg.format})")
    rows, joiner = rows.select_columns(columns), "" if cfg.format in LLM_ADAPTERS_FORMATS else " "

    def usable(part, wanted: int | None) -> list[tuple[str, str]]:
        pairs = []
        for row in part:
            if wanted is not None and len(pairs) >= wanted:
                break
            if not keep(row):
                continue
            x, y = to_pair(row)
            if cfg.long_rows == "truncate" or len(tokenizer(f"{x}{joiner}{y}")["input_ids"]) < cfg.max_length:
                pairs.append((x, y))  # (drop: the official LoRA-GA length filter)
        return pairs

    if cfg.val_rows == "random":
        if not 0 < cfg.n_val < len(rows):
            raise ConfigError(f"task {cfg.name!r}: val_rows=random needs 0 < n_val={cfg.n_val} < {len(rows)} rows")
        parts = rows.train_test_split(test_size=cfg.n_val, shuffle=True, seed=cfg.split_seed)
        train, val = usable(parts["train"], cfg.n_train), usable(parts["test"], None)
    else:
        pairs = usable(rows, (cfg.n_train if cfg.n_train is not None else len(rows)) + cfg.n_val)
        n_train = len(pairs) - cfg.n_val if cfg.n_train is None else min(cfg.n_train, len(pairs) - cfg.n_val)
        train, val = pairs[: max(n_train, 0)], pairs[max(n_train, 0) : n_train + cfg.n_val]
    if not train:
        raise ConfigError(
            f"task {cfg.name!r}: {len(train) + len(val)} usable rows leave nothing to train on with n_val={cfg.n_val}"
        )
    return train, val


def encode_pair(tokenizer, x: str, y: str, max_length: int, train_on_inputs: bool = False, official_eos: bool = False):
    """Token ids of the pair cut at max_length, and labels: every token with `train_on_inputs` (LLM-Adapters'
    default), else the response tokens only. LoRA-GA: x + " " + y + EOS as text; `official_eos` (LLM-Adapters):
    x + y, then the EOS id if the last token is not EOS and the cut left room for it."""
    if official_eos:
        ids = tokenizer(f"{x}{y}", truncation=True, max_length=max_length)["input_ids"]
        if ids[-1] != tokenizer.eos_token_id and len(ids) < max_length:
            ids = [*ids, tokenizer.eos_token_id]
    else:
        ids = tokenizer(f"{x} {y}{tokenizer.eos_token}", truncation=True, max_length=max_length)["input_ids"]
    if train_on_inputs:
        return {"input_ids": ids, "labels": list(ids)}
    n_prompt = len(tokenizer(x)["input_ids"])
    return {"input_ids": ids, "labels": [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]}


def pad_collate(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad input_ids (pad), attention_mask (0) and labels (-100) to the batch's longest example."""

    def collate(batch: list[dict]) -> dict:
        n = max(len(e["input_ids"]) for e in batch)
        pad = lambda seq, value: seq + [value] * (n - len(seq))
        return {
            "input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in batch]),
            "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in batch]),
            "labels": torch.tensor([pad(e["labels"], -100) for e in batch]),
        }

    return collate


# --- benchmarks ----------------------------------------------------------------------------------------------


def _source(cfg: TaskConfig, name: str) -> tuple[str | None, str | None]:
    """(hub id, local directory) of a benchmark's data."""
    where = cfg.eval_data.get(name) or DEFAULT_EVAL_DATA.get(name)
    if where is None:
        raise ConfigError(f"task {cfg.name!r}: no data for benchmark {name!r}: set task.eval_data.{name}=<path>")
    local = Path(resolve_path(where))
    return (None, str(local)) if local.exists() else (where, None)


def benchmark_items(cfg: TaskConfig) -> list[dict]:
    """Test examples of every benchmark in eval_sets: {"set", "prompt", ...what its scorer needs}."""
    items = []
    for name in cfg.eval_sets:
        if name == "gsm8k":
            hub, local = _source(cfg, name)
            ds = load_split(
                hub, "main" if hub else None, "test", local, task=cfg.name, local_option=f"task.eval_data.{name}"
            )
            rows = [{"set": name, "prompt": gsm8k.eval_prompt(r["question"]), "reference": r["answer"]} for r in ds]
        elif name == "humaneval":
            hub, local = _source(cfg, name)
            problems = humaneval.load_humaneval(hub or "openai/openai_humaneval", local)
            rows = [{"set": name, "prompt": humaneval.build_prompt(p["prompt"]), "problem": p} for p in problems]
        elif name == "mtbench":
            hub, local = _source(cfg, name)
            questions = mtbench.load_mtbench_questions(hub or local)
            # + " ": the first turn in the training format (x + " " + y), as the GSM8K and HumanEval prompts
            rows = [
                {"set": name, "prompt": ALPACA.format(instruction=q["turns"][0]) + " ", "question": q}
                for q in questions
            ]
        else:  # commonsense: LLM-Adapters' dataset/<dir>/test.json
            root = cfg.eval_data.get("commonsense")
            if root is None:
                raise ConfigError(
                    f"task {cfg.name!r}: benchmark {name!r} needs task.eval_data.commonsense=<LLM-Adapters dataset dir>"
                )
            path = Path(resolve_path(root)) / commonsense.DATASET_DIRS[name] / "test.json"
            if not path.is_file():
                raise ConfigError(f"task {cfg.name!r}: {path} does not exist (LLM-Adapters layout expected)")
            data = json.loads(path.read_text())
            verbatim = cfg.format != "commonsense_alpaca"  # the official evaluation's whitespace by default
            rows = [
                {"set": name, "prompt": commonsense.prompt(r["instruction"], verbatim), "answer": r["answer"]}
                for r in data
            ]
        items += rows[: cfg.test_limit] if cfg.test_limit is not None else rows
    return items


def generate(model, tokenizer, prompts: list[str], gen: GenerationConfig, ctx: EvalContext) -> list[list[str]]:
    """`gen.num_samples` completions per prompt: this process's share, batched (length-sorted, left padding,
    KV cache), gathered back in prompt order on every process."""
    acc = ctx.accelerator
    mine = list(range(acc.process_index, len(prompts), acc.num_processes))
    mine.sort(key=lambda i: len(prompts[i]))
    net = acc.unwrap_model(model)
    net.eval()
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # generation continues at the right edge
    # the sampling knobs go to generate as configured: without do_sample they are inert, as in LLM-Adapters' beam
    # search (num_beams=4 with temperature 0.1, top_p 0.75, top_k 40 set but unused)
    decoding = {"do_sample": gen.do_sample, "num_beams": gen.num_beams, "temperature": gen.temperature}
    decoding |= {"top_p": gen.top_p, "top_k": gen.top_k}
    out: list[tuple[int, list[str]]] = []
    try:
        show = ctx.progress and acc.is_main_process
        for start in tqdm(range(0, len(mine), gen.batch_size), desc=f"{ctx.split} generate", disable=not show):
            idx = mine[start : start + gen.batch_size]
            enc = tokenizer(
                [prompts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=gen.max_prompt_length,
            ).to(acc.device)
            enc.pop("token_type_ids", None)
            with torch.no_grad():
                seqs = net.generate(
                    **enc,
                    max_new_tokens=gen.max_new_tokens,
                    num_return_sequences=gen.num_samples,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **decoding,
                )
            texts = tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for k, i in enumerate(idx):
                out.append((i, texts[k * gen.num_samples : (k + 1) * gen.num_samples]))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
        net.train()
    gathered = gather_object(out) if acc.num_processes > 1 else out
    return [texts for _, texts in sorted(gathered, key=lambda t: t[0])]


def second_turns(model, tokenizer, cfg: TaskConfig, items: list[dict], completions: list[list[str]], ctx):
    """MT-bench's second-turn answers (FastChat's protocol), generated only when a judge will grade them."""
    if cfg.judge.endpoint is None:
        return None
    prompts = [mtbench.second_turn_prompt(it["prompt"], c[0], it["question"]) for it, c in zip(items, completions)]
    asked = [i for i, p in enumerate(prompts) if p is not None]
    texts = generate(model, tokenizer, [prompts[i] for i in asked], cfg.generation, ctx)
    answers = [None] * len(items)
    for i, t in zip(asked, texts):
        answers[i] = t[0]
    return answers


def score(
    cfg: TaskConfig,
    name: str,
    items: list[dict],
    completions: list[list[str]],
    out_dir: Path | None,
    second: list[str | None] | None = None,
) -> dict:
    """One benchmark's metrics (floats, plus a status string where a number would be made up); `second`: MT-bench's
    second-turn answers, when generated."""
    first = [c[0] for c in completions]
    if name == "gsm8k":
        return gsm8k.gsm8k_metrics(first, [it["reference"] for it in items], cfg.gsm8k_headline)
    if name == "humaneval":
        problems = [it["problem"] for it in items]
        samples = {p["task_id"]: c for p, c in zip(problems, completions)}
        ks = [k for k in (1, 10, 100) if k <= cfg.generation.num_samples]
        result = humaneval.score_samples(
            problems, samples, k=ks, timeout_s=cfg.sandbox_timeout_s, extraction=cfg.code_extraction
        )
        return {f"pass@{k}": result[f"pass@{k}"] for k in ks}
    if name == "mtbench":
        questions = [it["question"] for it in items]
        if out_dir is not None:  # the answers are the product: always kept, judged or not
            turns = [[a] + ([b] if b is not None else []) for a, b in zip(first, second or [None] * len(first))]
            lines = [json.dumps({"question_id": q["question_id"], "turns": t}) for q, t in zip(questions, turns)]
            (out_dir / "mtbench_answers.jsonl").write_text("\n".join(lines) + "\n")
        j = cfg.judge
        result = mtbench.judge_answers(questions, first, j.endpoint, j.model, j.api_key_env, second_answers=second)
        if out_dir is not None:
            (out_dir / "mtbench_judge.json").write_text(json.dumps(result, indent=1))
        metrics = {"status": result["status"], "n_answers": len(first)}
        scores = ("score", "score_turn1", "score_turn2")
        return metrics | {k: result[k] for k in scores if result.get(k) is not None}
    answers = [it["answer"] for it in items]
    return {"accuracy": commonsense.commonsense_accuracy(name, [commonsense.response_text(c) for c in first], answers)}


def by_set(items: Iterable[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it["set"], []).append(i)
    return groups


def instruct_evaluator(cfg: TaskConfig, tokenizer, collate) -> Callable:
    @torch.no_grad()
    def evaluate(model, examples: list, ctx: EvalContext) -> dict:
        if ctx.split == "val":  # held-out instruction data: mean response-token loss
            return lm_loss(model, examples, collate, ctx)
        if ctx.out_dir is not None and ctx.accelerator.is_main_process:
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
        completions = generate(model, tokenizer, [it["prompt"] for it in examples], cfg.generation, ctx)
        metrics, averaged = {}, []
        out_dir = ctx.out_dir if ctx.accelerator.is_main_process else None
        for name, idx in by_set(examples).items():
            group, answers = [examples[i] for i in idx], [completions[i] for i in idx]
            second = second_turns(model, tokenizer, cfg, group, answers, ctx) if name == "mtbench" else None
            result = score(cfg, name, group, answers, out_dir, second)
            metrics |= {f"{name}_{k}": v for k, v in result.items()}
            if name in commonsense.COMMONSENSE_TASKS:
                averaged.append(result["accuracy"])
            if out_dir is not None:
                rows = [{"prompt": examples[i]["prompt"], "completions": completions[i]} for i in idx]
                (out_dir / f"{name}_generations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        if len(averaged) > 1:
            metrics["commonsense_avg"] = float(np.mean(averaged))
        return metrics

    return evaluate


def lm_loss(model, examples: list, collate, ctx: EvalContext) -> dict[str, float]:
    acc = ctx.accelerator
    loader = acc.prepare_data_loader(DataLoader(examples, batch_size=ctx.batch_size, collate_fn=collate))
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        logits = model(**batch).logits.float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss_sum, count = acc.reduce(-(logp * mask).sum()), acc.reduce(mask.sum())
        total, tokens = total + float(loss_sum), tokens + int(count)
    model.train()
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": float(np.exp(mean))}


def load_instruct(cfg: TaskConfig, tokenizer) -> TaskData:
    check_instruct(cfg)
    train_pairs, val_pairs = sft_pairs(cfg, tokenizer)
    items = benchmark_items(cfg)
    official_eos = cfg.format in LLM_ADAPTERS_FORMATS
    encode = lambda pairs: [
        encode_pair(tokenizer, x, y, cfg.max_length, cfg.train_on_inputs, official_eos) for x, y in pairs
    ]
    collate = pad_collate(tokenizer.pad_token_id)
    plain = [{k: v for k, v in it.items() if k in ("set", "prompt")} for it in items]
    return TaskData(
        train=encode(train_pairs),
        val=by_length(encode(val_pairs)),
        test=items,
        collate=collate,
        num_labels=1,
        fingerprint=fingerprint(train_pairs, val_pairs, json.dumps(plain, sort_keys=True)),
        evaluate=instruct_evaluator(cfg, tokenizer, collate),
        metric="loss",
    )
