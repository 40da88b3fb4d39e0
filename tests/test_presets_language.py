"""Issue 5: language presets -- settings, smoke pipelines, GLUE / label-word / instruction-data semantics."""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from conftest import run_cli
from loralab import fixtures
from loralab.config import ConfigError
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
