"""GSM8K scoring: the official LoRA-GA rule (strict, the headline) beside lm-evaluation-harness's flexible-extract.

Sources read: Outsider565/LoRA-GA `reproduce/eval_gsm8k.py` (`extract_num`), `reproduce/utils.py`
(`model_inference`), `reproduce/data.py` (`load_gsm8k`, `load_meta_math`); EleutherAI lm-evaluation-harness
`lm_eval/tasks/gsm8k/gsm8k.yaml` (filters `strict-match` / `flexible-extract`, `exact_match` with
`regexes_to_ignore`).

* Prompt ``"Q: {question}\\nA: "``; at evaluation the official code tokenizes ``input_text + " "``, so the model
  continues after ``"A:  "`` -- the same text it was trained on (``x + " " + y``). `eval_prompt` adds that space.
* MetaMathQA targets are the response cut before ``"\\nThe answer is:"``, so a model trained that way ends its
  solution with GSM8K's own ``"#### 72"`` line.
* **strict** (LoRA-GA's `extract_num`, the headline): the first match of ``####\\s*(\\d+)`` in the completion and
  in the reference, ``int()`` of it; no match reads as 0 (so a missing answer equals a reference of 0, and
  ``"#### -3"`` or ``"#### 1,080"`` do not read as written -- kept, it is the official number).
* **flexible** (lm-evaluation-harness's flexible-extract): the *last* match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``
  in the completion; prediction and reference (the text after ``"#### "``) lose commas, ``$`` and a trailing
  ``.``, are lower-cased, and must be equal as strings; no match is never correct.
lm-evaluation-harness's own strict-match (``#### (\\-?[0-9\\.\\,]+)``) is not reported: LoRA-GA's is stricter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

STRICT = re.compile(r"####\s*(\d+)")  # LoRA-GA's extract_num pattern
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval's flexible-extract pattern
# lm-eval's gsm8k exact_match: regexes_to_ignore, applied in this order, then lower-casing
IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]
MODES = ("strict", "flexible")


def prompt(question: str) -> str:
    """The zero-shot prompt LoRA-GA trains and evaluates on (MetaMathQA queries and GSM8K questions)."""
    return f"Q: {question}\nA: "


def eval_prompt(question: str) -> str:
    """The text the model continues at evaluation: the prompt plus the space `model_inference` appends."""
    return prompt(question) + " "


def metamath_target(response: str) -> str:
    """A MetaMathQA response as LoRA-GA trains on it: everything before the trailing "\\nThe answer is:" line."""
    return response.split("\nThe answer is:")[0]


def strict_answer(text: str) -> int | None:
    """The official extraction: int of the first ``####\\s*(\\d+)``; None where it finds none (official: 0)."""
    match = STRICT.search(text)
    return int(match.group(1)) if match else None


def flexible_answer(completion: str) -> str | None:
    """lm-eval's flexible-extract: the last number-like match (first non-empty group), stripped; None if none."""
    matches = FLEXIBLE.findall(completion)
    if not matches:
        return None
    groups = [g for g in matches[-1] if g]
    return groups[0].strip() if groups else None


def normalise(text: str) -> str:
    """lm-eval's exact_match normalisation of GSM8K: regexes_to_ignore removed, ignore_case."""
    for pattern in IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def strict_correct(completion: str, reference: str) -> bool:
    # the official comparison: a missing number on either side reads as 0
    return (strict_answer(completion) or 0) == (strict_answer(reference) or 0)


def flexible_correct(completion: str, reference: str) -> bool:
    answer = flexible_answer(completion)
    return answer is not None and normalise(answer) == normalise(reference)


def gsm8k_scores(completions: Sequence[str], references: Sequence[str]) -> dict:
    """Both scores of `completions` against GSM8K `answer` fields (the full text ending in "#### <number>").

    Returns strict_match and flexible_extract accuracies, n, the strict rule's n_no_answer (completions without a
    ``#### <digits>`` line), and per item both extracted answers and verdicts."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    if not completions:
        raise ValueError("no completions to score")
    missing = [r for r in references if "####" not in r]
    if missing:
        raise ValueError(f"GSM8K reference without its '####' answer line: {missing[0][-80:]!r}")
    strict = [strict_correct(c, r) for c, r in zip(completions, references)]
    flexible = [flexible_correct(c, r) for c, r in zip(completions, references)]
    return {
        "strict_match": sum(strict) / len(strict),
        "flexible_extract": sum(flexible) / len(flexible),
        "n": len(strict),
        "n_no_answer": sum(strict_answer(c) is None for c in completions),
        "strict_answers": [strict_answer(c) for c in completions],
        "flexible_answers": [flexible_answer(c) for c in completions],
        "strict": strict,
        "flexible": flexible,
    }


def gsm8k_metrics(completions: Sequence[str], references: Sequence[str], headline: str = "strict") -> dict:
    """The reported GSM8K numbers: `accuracy` (the `headline` rule), strict_match, flexible_extract, n_no_answer."""
    if headline not in MODES:
        raise ValueError(f"GSM8K headline {headline!r}; choose one of {list(MODES)}")
    from loralab import metric_modules  # noqa: PLC0415  (its gsm8k module imports this one)

    scores = metric_modules.load("gsm8k").compute(predictions=list(completions), references=list(references))
    return {"accuracy": scores["strict_match" if headline == "strict" else "flexible_extract"], **scores}
