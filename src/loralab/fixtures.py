"""Tiny local datasets with the exact schema of the papers' hub data, for smoke runs (tests and `loralab.smoke`).

The content is synthetic and small (tens of rows); the column names, types, split names and file layouts are the
real ones (GLUE, MetaMathQA, GSM8K, Code-Feedback, HumanEval, WizardLM, MT-bench, commonsense-170k and
LLM-Adapters' test sets), so the smoke runs go through the same preprocessing code as a real run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from loralab.evals.commonsense import DATASET_DIRS

WORDS = "the a movie film good bad great awful plot actor scene long short fun dull story music ends starts".split()

# GLUE subset -> (text fields, number of labels (0: regression), dev split name)
GLUE_SCHEMA = {
    "cola": (["sentence"], 2, "validation"),
    "sst2": (["sentence"], 2, "validation"),
    "mrpc": (["sentence1", "sentence2"], 2, "validation"),
    "qqp": (["question1", "question2"], 2, "validation"),
    "stsb": (["sentence1", "sentence2"], 0, "validation"),
    "mnli": (["premise", "hypothesis"], 3, "validation_matched"),
    "qnli": (["question", "sentence"], 2, "validation"),
    "rte": (["sentence1", "sentence2"], 2, "validation"),
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def glue(root: Path, subset: str, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    fields, n_labels, dev = GLUE_SCHEMA[subset]
    rng = random.Random(seed)

    def rows(n):
        return [
            {
                **{f: sentence(rng) for f in fields},
                "label": round(rng.uniform(0, 5), 2) if n_labels == 0 else i % n_labels,
                "idx": i,
            }
            for i in range(n)
        ]

    out = root / f"glue_{subset}"
    write_jsonl(out / "train.jsonl", rows(n_train))
    write_jsonl(out / f"{dev}.jsonl", rows(n_test))
    return out


def metamath(root: Path, n: int = 40) -> Path:
    rows = []
    for i in range(n):
        a, b = i + 2, 3
        solve = f"She has {a} apples and buys {b} more, so {a} + {b} = {a + b}.\n#### {a + b}"
        kind = "GSM_Rephrased" if i % 4 else "MATH_AnsAug"  # the loader keeps GSM types only
        rows.append(
            {
                "type": kind,
                "query": f"Ann has {a} apples and buys {b}. How many?",
                "original_question": "",
                "response": f"{solve}\nThe answer is: {a + b}",
            }
        )
    return write_jsonl(root / "metamath" / "train.jsonl", rows).parent


def gsm8k(root: Path, n: int = 6) -> Path:
    rows = [
        {"question": f"Tom has {i} pens and gets 2 more. How many pens?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
        for i in range(n)
    ]
    return write_jsonl(root / "gsm8k" / "test.jsonl", rows).parent


def codefeedback(root: Path, n: int = 40) -> Path:
    rows = [
        {
            "query": f"Write a function that returns {i} plus its argument.",
            "answer": f"Here it is:\n```python\ndef add_{i}(x):\n    return x + {i}\n```\nIt adds {i}.",
            "resource": "synthetic",
            "lang": "python",
        }
        for i in range(n)
    ]
    return write_jsonl(root / "codefeedback" / "train.jsonl", rows).parent


def humaneval(root: Path) -> Path:
    """Two problems in openai_humaneval's schema (task_id, prompt, canonical_solution, test, entry_point)."""
    problems = [
        (
            "add",
            'def add(a, b):\n    """Return a + b."""\n',
            "    return a + b\n",
            "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        ),
        (
            "is_even",
            'def is_even(n):\n    """True if n is even."""\n',
            "    return n % 2 == 0\n",
            "def check(candidate):\n    assert candidate(4)\n    assert not candidate(3)\n",
        ),
    ]
    rows = [
        {"task_id": f"HumanEval/{i}", "prompt": p, "canonical_solution": s, "test": t, "entry_point": name}
        for i, (name, p, s, t) in enumerate(problems)
    ]
    return write_jsonl(root / "humaneval" / "test.jsonl", rows).parent


def wizardlm(root: Path, n: int = 40) -> Path:
    rng = random.Random(1)
    rows = [{"instruction": f"Describe {sentence(rng, 3)}.", "output": sentence(rng, 12)} for _ in range(n)]
    rows[0]["output"] = "Sorry, as an AI I cannot."  # dropped by the loader's filter, as in the official code
    return write_jsonl(root / "wizardlm" / "train.jsonl", rows).parent


def mtbench(root: Path) -> Path:
    """FastChat's question.jsonl schema."""
    rows = [
        {"question_id": 81 + i, "category": c, "turns": [t, "Now shorter."]}
        for i, (c, t) in enumerate([("writing", "Write a haiku about rain."), ("math", "What is 3 + 4?")])
    ]
    return write_jsonl(root / "mtbench" / "question.jsonl", rows)


CHOICES = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "siqa": ["answer1", "answer2", "answer3"],
    "hellaswag": [f"ending{i}" for i in range(1, 5)],
    "winogrande": ["option1", "option2"],
    "arc_e": [f"answer{i}" for i in range(1, 5)],
    "arc_c": [f"answer{i}" for i in range(1, 5)],
    "obqa": [f"answer{i}" for i in range(1, 5)],
}


def commonsense(root: Path, n_train: int = 40, n_test: int = 4) -> tuple[Path, Path]:
    """commonsense_170k rows (instruction, input, output, answer) and LLM-Adapters' dataset/<dir>/test.json files."""
    rng = random.Random(2)

    def row(task):
        answer = rng.choice(CHOICES[task])
        question = f"Please choose the correct answer. {sentence(rng, 6)}? Answer format: {'/'.join(CHOICES[task])}"
        return {"instruction": question, "input": "", "output": f"the correct answer is {answer}", "answer": answer}

    train = write_jsonl(
        root / "commonsense_170k" / "train.jsonl", [row(rng.choice(list(CHOICES))) for _ in range(n_train)]
    )
    tests = root / "commonsense_tests"
    for task, folder in DATASET_DIRS.items():
        (tests / folder).mkdir(parents=True, exist_ok=True)
        (tests / folder / "test.json").write_text(json.dumps([row(task) for _ in range(n_test)]))
    return train.parent, tests
