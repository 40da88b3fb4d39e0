"""Issue 5: language presets -- settings, smoke pipelines, GLUE / label-word / instruction-data semantics."""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from conftest import run_cli
from loralab import fixtures
from loralab.config import ConfigError
from loralab.evals import commonsense
from loralab.models import build_tokenizer, model_config
from loralab.record import RESULT_FILE, Status
from loralab.smoke import SMOKE, SMOKE_EXPERIMENT, run_smoke
from loralab.tasks import EvalContext, load_task
from loralab.tasks.instruct import FORMATS, encode_pair, sft_pairs
from loralab.train import make_accelerator

EXPECTED_METRICS = {
    "lora_rank": ["test/accuracy"],
    "lora_subspace": ["test/accuracy"],
    "lora_amplification": ["test/accuracy"],
    "loraga_glue_t5": ["test/accuracy", "test/f1"],
    "liera_glue": ["test/pearson", "test/spearmanr"],
    "loraga_llama": [
        "test/gsm8k_accuracy",
        "test/gsm8k_strict_match",
        "test/gsm8k_flexible_extract",
        "test/humaneval_pass@1",
        "test/mtbench_status",
        "val/loss",
    ],
    "liera_commonsense": ["test/commonsense_avg", "test/boolq_accuracy", "val/perplexity"],
    "liera_vtab": ["test/accuracy"],
    "liera_coco": [],  # its metric names are checked in test_vision_presets
}


def test_loraga_glue_t5_prints_the_paper_settings(tmp_path):
    out = run_cli("experiment=loraga_glue_t5", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for line in [
        "lr: 0.0001",
        "batch_size: 32",
        "epochs: 1",
        "warmup_ratio: 0.03",
        "scheduler: cosine",
        "weight_decay: 0.0",
        "max_length: 128",
        "kind: text2text",
        "rank: 8",
        "alpha: 16",
        "precision: 'no'",  # fp32, as the official T5 runs
        "target_padding: train",
        "grad_sample: first",
    ]:
        assert line in out.stdout, line


def test_every_preset_defines_its_sweep():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from loralab.smoke import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=loraga_glue_t5"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        assert params.variant.split(",") == [
            "full",
            "lora",
            "pissa",
            "rslora",
            "lora_plus",
            "dora",
            "adalora_static",
            "loraga",
        ]
        assert params.task.split(",") == ["glue_mnli", "glue_sst2", "glue_cola", "glue_qnli", "glue_mrpc"]
        assert params.seed == "0,1,2"
        llama = compose(config_name="config", overrides=["experiment=loraga_llama"], return_hydra_config=True)
        assert llama.hydra.sweeper.params.rank == "8,32,128" and llama.train.lr == 2e-5
        assert llama.train.batch_size * llama.train.grad_accum == 32 and llama.model.dtype == "bfloat16"
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("preset", sorted(SMOKE))
def test_smoke_runs_the_whole_pipeline(preset, tmp_path):
    records = run_smoke(preset, tmp_path)
    results = tmp_path / "results"  # the smoke jobs' paths.results_dir
    metrics = {k: v for r in records for k, v in r.metrics.items()}
    for record in records:
        assert record.status == Status.COMPLETED and record.identity.experiment == SMOKE_EXPERIMENT.get(preset, preset)
        assert json.loads((results / record.run_dir / RESULT_FILE).read_text())["status"] == "completed"
        assert record.data["fingerprint"]
    assert len({r.run_dir for r in records}) == len(records)  # every job of a preset has its own run
    for key in EXPECTED_METRICS[preset]:
        assert key in metrics, (key, sorted(metrics))
    if preset == "loraga_llama":  # never a fake score: no judge configured -> "not judged", answers still saved
        assert metrics["test/mtbench_status"] == "not judged" and "test/mtbench_score" not in metrics
        run = next(r for r in records if r.identity.task == "wizardlm_mtbench")
        answers = (results / run.run_dir / "eval" / "mtbench_answers.jsonl").read_text()
        assert len(answers.splitlines()) == 2


def test_glue_fixture_splits_and_errors(compose_cfg, tmp_path):
    data_dir = fixtures.glue(tmp_path, "rte")
    cfg = compose_cfg("model=tiny_roberta", "task=glue_rte", f"task.data_dir={data_dir}", "task.n_val=8")
    data = load_task(cfg.task, build_tokenizer(cfg.model))
    assert data.sizes == {"train": 40, "val": 8, "test": 16} and data.metric == "accuracy"
    again = load_task(cfg.task, build_tokenizer(cfg.model))
    assert again.fingerprint == data.fingerprint  # deterministic preprocessing
    bad = compose_cfg("model=tiny_roberta", "task=glue_rte", f"task.data_dir={data_dir}", "task.test_split=test")
    with pytest.raises(ConfigError, match="no split 'test'"):
        load_task(bad.task, build_tokenizer(bad.model))
    wrong = compose_cfg("model=tiny_roberta", "task=glue_rte", f"task.data_dir={data_dir}", "task.text_fields=[a,b]")
    with pytest.raises(ConfigError, match=r"columns \['a', 'b'\] missing"):
        load_task(wrong.task, build_tokenizer(wrong.model))


def _t5(compose_cfg, tmp_path, *extra):
    data_dir = fixtures.glue(tmp_path, "mnli")
    cfg = compose_cfg("model=tiny_t5", "task=glue_mnli", "task.kind=text2text", f"task.data_dir={data_dir}", *extra)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(model_config(cfg.model, 3)).eval()
    tokenizer = build_tokenizer(cfg.model)
    return cfg, model, tokenizer, load_task(cfg.task, tokenizer)


@pytest.mark.parametrize("scoring", ["first_token", "sequence"])
def test_label_word_scoring_matches_a_direct_computation(scoring, compose_cfg, tmp_path):
    cfg, model, tokenizer, data = _t5(compose_cfg, tmp_path, f"task.label_scoring={scoring}")
    ctx = EvalContext(make_accelerator(cfg.train), batch_size=5, split="test")
    words = [
        tokenizer(w, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id] for w in cfg.task.label_words
    ]
    expected = []
    with torch.no_grad():
        for example in data.test:
            ids = torch.tensor([example["input_ids"]])
            if scoring == "first_token":  # logits of each word's first token at the first decoder step
                start = torch.tensor([[model.config.decoder_start_token_id]])
                logits = model(input_ids=ids, decoder_input_ids=start).logits[0, 0]
                scores = [logits[w[0]] for w in words]
            else:  # log-likelihood of each word's whole sequence, token by token
                scores = []
                for w in words:
                    logp = torch.log_softmax(model(input_ids=ids, labels=torch.tensor([w])).logits[0], -1)
                    scores.append(sum(logp[t, tok] for t, tok in enumerate(w)))
            expected.append(int(torch.stack(scores).argmax()))
    refs = [e["class_id"] for e in data.test]
    metrics = data.evaluate(model, data.test, ctx)
    assert metrics["accuracy"] == pytest.approx(sum(p == r for p, r in zip(expected, refs)) / len(refs), abs=1e-12)


def test_label_words_sharing_a_first_token_need_sequence_scoring(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="share a first token"):
        _t5(compose_cfg, tmp_path, "task.label_words=[entailment,entailment_x,contradiction]")


def test_instruction_data_follow_the_official_preprocessing(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "model=tiny_llama",
        "task=metamath_gsm8k",
        f"task.data_dir={fixtures.metamath(tmp_path)}",
        "task.n_train=10",
        "task.n_val=3",
    )
    tokenizer = build_tokenizer(cfg.model)
    train, val = sft_pairs(cfg.task, tokenizer)
    assert len(train) == 10 and len(val) == 3
    # GSM types only, in file order (rows 1, 2, 3, 5, ... : every 4th row is MATH_AnsAug), answer line dropped
    assert train[0][0] == "Q: Ann has 3 apples and buys 3. How many?\nA: " and train[3][0].startswith("Q: Ann has 7 ")
    assert train[0][1].endswith("#### 6") and "The answer is" not in train[0][1]
    example = encode_pair(tokenizer, *train[0], max_length=512)
    n_prompt = len(tokenizer(train[0][0])["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt  # loss on the response only
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    keep, to_pair = FORMATS["codefeedback"][1:]
    row = {"query": "q", "answer": "text\n```python\nx = 1\n```\nmore ```y```"}
    assert keep(row) and to_pair(row)[1] == "text\n```python\nx = 1\n```"
    assert not FORMATS["wizardlm"][1]({"instruction": "i", "output": "As an AI, no."})
    short = compose_cfg(
        "model=tiny_llama",
        "task=metamath_gsm8k",
        f"task.data_dir={fixtures.metamath(tmp_path)}",
        "task.max_length=20",
        "task.n_val=0",
    )
    with pytest.raises(ConfigError, match="leave nothing to train on"):  # every pair is longer than 20 tokens: filtered
        sft_pairs(short.task, tokenizer)


# --- LieRA / LoRA presets (issue 14) ---------------------------------------------------------------------------


def spm_tokenizer_dir(root, lines) -> tuple:
    """A DeBERTa-v3-style tokenizer directory as the hub ships it: only spm.model (trained here, offline, with
    sentencepiece), tokenizer_config.json and the model's config.json."""
    import sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(root / "spm"),
        vocab_size=120,
        hard_vocab_limit=False,  # a small corpus: up to 120 pieces
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"],
        minloglevel=2,
    )
    (root / "spm.vocab").unlink()
    (root / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(root / "spm.model"))
    (root / "config.json").write_text(json.dumps({"model_type": "deberta-v2", "vocab_size": sp.get_piece_size()}))
    return root, sp


def test_deberta_v3_spm_tokenizer_loads_through_the_harness_and_trains(compose_cfg, tmp_path):
    """Issue 14 item 1: the DeBERTa-v2 tokenizer from a bare spm.model (transformers reads it with sentencepiece)
    loads through models.build_tokenizer, encodes as sentencepiece does ([CLS] pieces [SEP]) and runs a job."""
    from loralab.runner import run_job

    data_dir = fixtures.glue(tmp_path, "stsb")
    lines = [
        json.loads(row)[field]
        for row in (data_dir / "train.jsonl").read_text().splitlines()
        for field in ("sentence1", "sentence2")
    ]
    corpus = lines + [f"line {i}: {lines[i % len(lines)]} and {i * 37 % 1000} more" for i in range(300)]
    tok_dir, sp = spm_tokenizer_dir(tmp_path / "deberta_spm", corpus)
    overrides = [
        "experiment=liera_glue",
        "model=tiny_deberta",
        f"model.tokenizer={tok_dir}",
        f"model.config.vocab_size={sp.get_piece_size()}",
        "task=glue_stsb",
        f"task.data_dir={data_dir}",
        "task.max_length=32",
        "rank=2",
        "train.max_steps=2",
        "train.epochs=0",
        "train.batch_size=4",
        "train.eval_every=1",
        "train.eval_unit=steps",
        "train.progress=false",
        "logger=none",
        "analyses=[]",
    ]
    cfg = compose_cfg(*overrides)
    tokenizer = build_tokenizer(cfg.model)
    assert type(tokenizer).__name__.startswith("DebertaV2Tokenizer")
    text = lines[0]
    assert tokenizer(text)["input_ids"] == [1, *sp.encode(text), 2]
    record = run_job(cfg, overrides=overrides)
    assert record.status == Status.COMPLETED and "test/pearson" in record.metrics
    assert "test_best/pearson" in record.metrics  # the dev set at every evaluation, as the preset asks


def test_a_missing_sentencepiece_is_a_config_error(compose_cfg, tmp_path, monkeypatch):
    import importlib.util

    import transformers

    def needs_spm(*args, **kwargs):
        raise ValueError("tiktoken is required")  # what transformers 5 raised without sentencepiece

    cfg = compose_cfg("model=deberta_v3_base")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", needs_spm)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "sentencepiece" else real_find_spec(name)
    )
    with pytest.raises(ConfigError, match="needs the sentencepiece package"):
        build_tokenizer(cfg.model)


def _commonsense(compose_cfg, tmp_path, *overrides):
    train_dir, tests_dir = fixtures.commonsense(tmp_path)
    cfg = compose_cfg(
        "experiment=liera_commonsense",
        "model=tiny_llama",
        f"task.data_dir={train_dir}",
        f"+task.eval_data.commonsense={tests_dir}",
        "task.n_val=4",
        *overrides,
    )
    return cfg, build_tokenizer(cfg.model), train_dir


# finetune.py's generate_prompt (no input), its f-string written out: the literal 16-space indentation and the two
# spaces after "request." are part of what the official model trained on
OFFICIAL_TRAIN = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)
# commonsense_evaluate.py's generate_prompt (no input)
OFFICIAL_EVAL = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Response:\n"
    "                "
)


def test_liera_commonsense_uses_the_official_templates_split_and_loss(compose_cfg, tmp_path):
    """train_on_inputs (loss on every token), the official train/eval templates, 120-of-N random validation rows as
    datasets' train_test_split(seed=42) draws them (np.random.default_rng(42).permutation), no length filter."""
    import numpy as np
    from datasets import load_dataset

    from loralab.tasks.instruct import benchmark_items

    cfg, tokenizer, train_dir = _commonsense(compose_cfg, tmp_path)
    rows = load_dataset("json", data_files=str(train_dir / "train.jsonl"), split="train")
    train, val = sft_pairs(cfg.task, tokenizer)
    assert len(train) + len(val) == len(rows) == 40 and len(val) == 4
    held_out = np.random.default_rng(42).permutation(len(rows))[:4]
    assert [y for _, y in val] == [rows[int(i)]["output"] for i in held_out]
    first = rows[int(held_out[0])]
    assert val[0][0] + val[0][1] == OFFICIAL_TRAIN.format(**first)
    items = benchmark_items(cfg.task)
    test_row = json.loads((tmp_path / "commonsense_tests" / "boolq" / "test.json").read_text())[0]
    assert items[0]["prompt"] == OFFICIAL_EVAL.format(instruction=test_row["instruction"])
    data = load_task(cfg.task, tokenizer)
    example = data.train[0]
    assert example["labels"] == example["input_ids"]  # train_on_inputs: prompt and response both in the loss
    masked = compose_cfg(*_overrides(cfg, tmp_path), "task.train_on_inputs=false")
    example = load_task(masked.task, tokenizer).train[0]
    n_prompt = example["labels"].count(-100)
    assert n_prompt > 0 and example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    alpaca = compose_cfg(*_overrides(cfg, tmp_path), "task.format=commonsense_alpaca")
    assert benchmark_items(alpaca.task)[0]["prompt"] == commonsense.prompt(test_row["instruction"])


def _overrides(cfg, tmp_path) -> list[str]:
    return [
        "experiment=liera_commonsense",
        "model=tiny_llama",
        f"task.data_dir={cfg.task.data_dir}",
        f"+task.eval_data.commonsense={tmp_path / 'commonsense_tests'}",
        "task.n_val=4",
    ]


def test_commonsense_rows_are_cut_at_cutoff_len_not_dropped(compose_cfg, tmp_path):
    """LLM-Adapters' tokenize(): truncation at cutoff_len, EOS only where it fits; no row is dropped (LoRA-GA's
    length filter, long_rows=drop, drops them)."""
    cfg, tokenizer, train_dir = _commonsense(compose_cfg, tmp_path)
    rows = [json.loads(line) for line in (train_dir / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):  # responses of different lengths
        row["output"] += " because" * (i % 7) * 3
    (train_dir / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, _ = sft_pairs(cfg.task, tokenizer)
    full = [tokenizer(x + y)["input_ids"] for x, y in train]
    cutoff = sorted(len(ids) for ids in full)[len(full) // 2]  # about half the rows are longer

    def official_tokenize(text: str) -> list[int]:  # finetune.py's tokenize(), line by line
        ids = tokenizer(text, truncation=True, max_length=cutoff, padding=False)["input_ids"]
        if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff:
            ids.append(tokenizer.eos_token_id)
        return ids

    cut = compose_cfg(*_overrides(cfg, tmp_path), f"task.max_length={cutoff}")
    data = load_task(cut.task, tokenizer)
    assert len(data.train) == len(train)
    for example, (x, y) in zip(data.train, train):
        assert example["input_ids"] == official_tokenize(x + y) and len(example["input_ids"]) <= cutoff
    assert any(len(ids) > cutoff for ids in full) and any(len(ids) < cutoff for ids in full)
    dropped, _ = sft_pairs(
        compose_cfg(*_overrides(cfg, tmp_path), f"task.max_length={cutoff}", "task.long_rows=drop").task, tokenizer
    )
    assert len(dropped) < len(train)


def test_commonsense_decoding_is_beam_search_with_the_official_settings(compose_cfg, tmp_path):
    """num_beams=4 (and the official inert temperature/top_p/top_k) reach generate; the text equals a direct
    beam-search generate call on the same prompt."""
    from transformers import AutoModelForCausalLM

    from loralab.tasks.instruct import benchmark_items, generate

    cfg, tokenizer, _ = _commonsense(compose_cfg, tmp_path, "task.generation.max_new_tokens=6")
    gen = cfg.task.generation
    assert (gen.num_beams, gen.temperature, gen.top_p, gen.top_k, gen.do_sample) == (4, 0.1, 0.75, 40, False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(cfg.model, 1)).eval()
    seen, real = [], model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    model.generate = spy
    prompt = benchmark_items(cfg.task)[0]["prompt"]
    ctx = EvalContext(make_accelerator(cfg.train), batch_size=1, split="test")
    (texts,) = generate(model, tokenizer, [prompt], gen, ctx)
    assert seen[0]["num_beams"] == 4 and seen[0]["do_sample"] is False and seen[0]["top_k"] == 40
    enc = tokenizer([prompt], return_tensors="pt")
    enc.pop("token_type_ids", None)
    direct = real(**enc, max_new_tokens=6, num_beams=4, do_sample=False, pad_token_id=0, eos_token_id=102)
    assert texts == [tokenizer.decode(direct[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)]


@pytest.mark.parametrize(
    ("model", "variant", "rank", "lr", "alpha"),
    [
        ("llama_7b", "lora", 32, 2e-4, 64),
        ("llama_7b", "dora", 16, 2e-4, 32),
        ("llama_7b", "lierra", 32, 2e-3, 64),
        ("llama3_8b", "lora", 16, 1e-4, 32),
        ("llama3_8b", "lierra", 32, 1e-3, 64),
    ],
)
def test_liera_commonsense_lr_and_alpha_per_model_variant_rank(compose_cfg, model, variant, rank, lr, alpha):
    cfg = compose_cfg("experiment=liera_commonsense", f"model={model}", f"variant={variant}", f"rank={rank}")
    assert cfg.train.lr == pytest.approx(lr) and cfg.variant.alpha == alpha
    assert (cfg.train.eval_every, cfg.train.select_best, cfg.train.precision, cfg.model.dtype) == (
        80,
        "loss",
        "fp16",
        "float16",
    )
    assert compose_cfg("experiment=liera_commonsense", f"variant={variant}", "train.lr=3e-4").train.lr == 3e-4


def test_presets_give_each_variant_its_own_lr(compose_cfg):
    assert compose_cfg("experiment=liera_glue", "variant=lora").train.lr == pytest.approx(5e-4)
    assert compose_cfg("experiment=liera_glue", "variant=liera").train.lr == pytest.approx(5e-3)
    assert compose_cfg("variant=lierra").train.lr == pytest.approx(2e-2)  # the default job: LieRA's own lr
    assert compose_cfg("variant=lora").train.lr == pytest.approx(5e-4)
    from loralab.runner import check_inputs

    with pytest.raises(ConfigError, match=r"train.lr: no entry 'pissa' in \['dora', 'lierra', 'lora'\]"):
        check_inputs(compose_cfg("experiment=liera_commonsense", "variant=pissa"))
