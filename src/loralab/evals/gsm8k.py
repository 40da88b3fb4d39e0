"""GSM8K answer handling with the semantics of the official LoRA-GA evaluation.

Source read: Outsider565/LoRA-GA `reproduce/eval_gsm8k.py` and `examples/eval_gsm8k.py` (identical rule) and
`reproduce/data.py` (`load_gsm8k`, `load_meta_math`). What they do:

* Prompt: ``"Q: {question}\\nA: "``; the model continues after it.
* Training targets (MetaMathQA, GSM-type rows only) are the response cut before ``"\\nThe answer is:"``, so a
  model trained that way ends its solution with GSM8K's own ``"#### 72"`` line.
* Scoring: the first match of ``####\\s*(\\d+)`` in the generated text and in the reference, ``int()`` of it,
  exact equality. No match scores as 0. There is no "last number in the text" fallback.

The official regex takes digits only, so ``"#### 1,080"`` reads as 1, ``"#### -3"`` and ``"#### 2.5"`` do not
parse as written, and a missing answer equals a reference of 0. `strict=True` reproduces the digits-only rule
(but a missing answer is None, never correct); the default reads the whole number after the marker — sign,
``$``, thousands commas, decimals, ``a/b`` fractions — and also accepts MetaMathQA's ``"The answer is: 72"`` when
no ``####`` answer is present.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

# Integer part with thousands separators only where they are well formed ("1,080", not "10,80").
_NUMBER = r"(?P<sign>[-−+])?\s*\$?\s*(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?)"
_HASH = re.compile(r"####\s*" + _NUMBER)
_ANSWER_IS = re.compile(r"the answer is\s*:?\s*" + _NUMBER, re.IGNORECASE)
_OFFICIAL = re.compile(r"####\s*(\d+)")  # LoRA-GA's extract_num pattern
ABS_TOL = 1e-6  # numeric equality tolerance of is_correct


def prompt(question: str) -> str:
    """The zero-shot prompt LoRA-GA uses for GSM8K and MetaMathQA."""
    return f"Q: {question}\nA: "


def metamath_target(response: str) -> str:
    """A MetaMathQA response as LoRA-GA trains on it: everything before the trailing "\\nThe answer is:" line."""
    return response.split("\nThe answer is:")[0]


def _clean(match: re.Match) -> str:
    num = re.sub(r"[,\s]", "", match.group("num"))
    return ("-" if match.group("sign") in ("-", "−") else "") + num


def reference_answer(answer_field: str) -> str:
    """The number after "####" in a GSM8K `answer` field, commas removed (e.g. "...\\n#### 1,080" → "1080")."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer field has no '####' line: {answer_field[-80:]!r}")
    match = _HASH.search(answer_field)
    if match is None:
        raise ValueError(f"no number after '####' in {answer_field[-80:]!r}")
    return _clean(match)


def extract_answer(completion: str, strict: bool = False) -> str | None:
    """The predicted answer in a generated completion, or None when there is none.

    Rule (LoRA-GA's, see module docstring): the number after the first "####" that is followed by a number.
    Default: the full number (sign, "$", commas, decimals, fractions; commas and "$" removed); if no "####"
    answer exists, the number after the first "The answer is" (case-insensitive, optional colon) — the
    MetaMathQA convention. Never the last number in the text.
    `strict=True`: exactly the official digits-only regex ``####\\s*(\\d+)``, nothing else.
    """
    if strict:
        match = _OFFICIAL.search(completion)
        return match.group(1) if match else None
    match = _HASH.search(completion) or _ANSWER_IS.search(completion)
    return _clean(match) if match else None


def _to_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").replace("$", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(prediction: str | None, reference: str | None) -> bool:
    """Numeric equality within ABS_TOL after normalisation; a missing or unparsable prediction is wrong."""
    if prediction is None or reference is None:
        return False
    pred, ref = _to_number(prediction), _to_number(reference)
    if pred is None or ref is None:
        return False
    return abs(float(pred) - float(ref)) <= ABS_TOL


def gsm8k_accuracy(completions: Sequence[str], references: Sequence[str], strict: bool = False) -> dict:
    """Accuracy of `completions` against `references`.

    Each reference is either a raw GSM8K `answer` field (contains "####") or an already-extracted number.
    Returns accuracy, n, n_correct, n_no_answer and per item the extracted prediction and whether it is correct.
    """
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    if not completions:
        raise ValueError("no completions to score")
    refs = [reference_answer(r) if "####" in r else r.strip() for r in references]
    extracted = [extract_answer(c, strict=strict) for c in completions]
    correct = [is_correct(p, r) for p, r in zip(extracted, refs)]
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "n_correct": sum(correct),
        "n_no_answer": sum(p is None for p in extracted),
        "extracted": extracted,
        "references": refs,
        "correct": correct,
    }
