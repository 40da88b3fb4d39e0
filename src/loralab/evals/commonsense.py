"""The eight commonsense-reasoning tasks scored as LLM-Adapters scores them.

Source read: AGI-Edgerunners/LLM-Adapters `commomsense_evaluate.py` (sic, the repo's file name) and its copy
Chongjie-Si/Subspace-Tuning `CR_MR/commonsense_evaluate.py`, which LieRA's official code uses; the two have the
same `extract_answer` and `generate_prompt`. Their rule: per dataset, `re.findall` of a case-sensitive
alternation of the label words on the stripped response, first hit wins, no hit → "" (never equal to a label);
a prediction is right when it equals the `answer` field of the test item exactly. Note SIQA shares the
answer1..answer5 alternation with ARC and OBQA although it has three options, so "answer4" is a (wrong)
prediction for SIQA rather than no prediction; kept as is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Paper order (LieRA/DoRA tables); names match the columns of reference/liera_commonsense.csv.
COMMONSENSE_TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"]

# Dataset directory names in LLM-Adapters' `dataset/<name>/test.json`, also accepted as task names.
DATASET_DIRS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_e": "ARC-Easy",
    "arc_c": "ARC-Challenge",
    "obqa": "openbookqa",
}

_ANSWER_1_TO_5 = re.compile(r"answer1|answer2|answer3|answer4|answer5")
_PATTERNS = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "siqa": _ANSWER_1_TO_5,
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
    "arc_e": _ANSWER_1_TO_5,
    "arc_c": _ANSWER_1_TO_5,
    "obqa": _ANSWER_1_TO_5,
}

# Alpaca's no-input template, as LLM-Adapters' finetune.py/commonsense_evaluate.py intend it (`alpaca`).
_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# What their strings literally contain (`official`, the default): the f-strings are indented in the source, so every
# line after the first starts with 16 spaces. The two files differ: training (finetune.py `generate_prompt`) ends
# its first line with two spaces and its blank line holds 16 spaces; evaluation (commonsense_evaluate.py
# `generate_prompt`) has one space and an empty blank line. Both end in 16 spaces, where the response begins.
_PAD = " " * 16
_TEMPLATE_VERBATIM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    f"{_PAD}### Instruction:\n{_PAD}{{instruction}}\n\n{_PAD}### Response:\n{_PAD}"
)
_TRAIN_TEMPLATE_VERBATIM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    f"{_PAD}### Instruction:\n{_PAD}{{instruction}}\n{_PAD}\n{_PAD}### Response:\n{_PAD}"
)


def _task(task: str) -> str:
    key = {v: k for k, v in DATASET_DIRS.items()}.get(task, task.lower())
    if key not in _PATTERNS:
        raise ValueError(f"unknown commonsense task {task!r}; known: {COMMONSENSE_TASKS}")
    return key


def prompt(instruction: str, verbatim: bool = False) -> str:
    """The evaluation prompt the model answers; `verbatim=True` is the official evaluation's exact whitespace."""
    return (_TEMPLATE_VERBATIM if verbatim else _TEMPLATE).format(instruction=instruction)


def train_prompt(instruction: str, verbatim: bool = False) -> str:
    """The training prompt (the response follows it directly); `verbatim=True` is finetune.py's exact whitespace."""
    return (_TRAIN_TEMPLATE_VERBATIM if verbatim else _TEMPLATE).format(instruction=instruction)


def response_text(decoded: str) -> str:
    """The model's answer in a decoded prompt+generation: the text after the last "### Response:", stripped."""
    return decoded.split("### Response:")[-1].strip()


def extract_choice(task: str, response: str) -> str | None:
    """First label word of `task` in `response` (e.g. "solution2" for PIQA), or None if none appears."""
    found = _PATTERNS[_task(task)].findall(response.strip())
    return found[0] if found else None


def commonsense_accuracy(task: str, responses: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of responses whose extracted choice equals the gold `answer` string exactly."""
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    if not responses:
        raise ValueError("no responses to score")
    hits = sum(extract_choice(task, r) == a for r, a in zip(responses, answers))
    return hits / len(responses)
