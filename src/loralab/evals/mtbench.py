"""MT-bench single-answer grading of both turns by an LLM judge over an OpenAI-compatible HTTP API.

Follows FastChat's `fastchat/llm_judge` (lm-sys/FastChat: `data/judge_prompts.jsonl` prompts "single-v1",
"single-math-v1" and their "-multi-turn" forms, `common.py` for the rating regexes, the reference categories,
temperature 0, max_tokens 2048; `show_result.py`: the MT-bench score is the mean rating over every question and turn).
The judge instructions below are our wording of those prompts, not a copy, with the same structure and the same
"[[rating]]" output format, so scores are comparable in kind but not guaranteed identical to FastChat's. The second
turn is judged on the whole conversation, focusing on the second answer, as FastChat does.
Generation of the answers happens elsewhere (`second_turn_prompt` builds the second turn's input); this module
builds judge requests and reads ratings.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

# FastChat judges these categories against a reference answer (NEED_REF_CATS in common.py).
NEED_REF_CATS = ("math", "reasoning", "coding")
MAX_TOKENS = 2048  # FastChat's judge completion length for OpenAI models

_SYSTEM = "You are a helpful assistant."
_RATE = (
    'After the explanation you must rate the response on a scale of 1 to 10, strictly in this format: "[[rating]]", '
    'for example: "Rating: [[5]]".'
)
_GENERAL = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response that an AI assistant "
    "gave to the user question shown below. Consider the helpfulness, relevance, accuracy, depth, creativity and "
    "level of detail of the response. Begin your evaluation with a short explanation. Be as objective as possible. "
    f"{_RATE}\n\n"
    "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
_WITH_REFERENCE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response that an AI assistant "
    "gave to the user question shown below. Consider correctness and helpfulness. You are given a reference answer "
    "and the assistant's answer. Begin your evaluation by comparing the assistant's answer with the reference "
    f"answer; identify and correct any mistakes. Be as objective as possible. {_RATE}\n\n"
    "[Question]\n{question}\n\n[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)

_MULTI_GENERAL = (
    "Please act as an impartial judge and evaluate the quality of the response that an AI assistant gave to the "
    "user question shown below. Consider the helpfulness, relevance, accuracy, depth, creativity and level of detail "
    "of the response. Judge the assistant's answer to the second user question only. Begin your evaluation with a "
    f"short explanation. Be as objective as possible. {_RATE}"
)
_MULTI_WITH_REFERENCE = (
    "Please act as an impartial judge and evaluate the quality of the response that an AI assistant gave to the "
    "user question shown below. Consider correctness and helpfulness. You are given reference answers and the "
    "assistant's answers. Judge the assistant's answer to the second user question only. Begin your evaluation by "
    "comparing the assistant's answer with the reference answer; identify and correct any mistakes. Be as objective "
    f"as possible. {_RATE}"
)
_CONVERSATION = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{q1}\n\n### Assistant A:\n{a1}\n\n"
    "### User:\n{q2}\n\n### Assistant A:\n{a2}\n\n<|The End of Assistant A's Conversation with User|>"
)
_REFERENCE_CONVERSATION = (
    "<|The Start of Reference Answer|>\n\n### User:\n{q1}\n\n### Reference answer:\n{r1}\n\n"
    "### User:\n{q2}\n\n### Reference answer:\n{r2}\n\n<|The End of Reference Answer|>\n\n\n"
)
# the second turn's input after the first turn's prompt and answer: the training format's next instruction
FOLLOW_UP = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"

# FastChat's one_score_pattern and its backup: "[[7.5]]" first, else a single-bracket "[7.5]".
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def _reference(question: dict) -> str | None:
    ref = question.get("reference")
    if isinstance(ref, str):
        return ref or None
    return ref[0] if ref else None


def judge_prompt(question: dict, answer: str, reference: str | None = None) -> list[dict]:
    """Chat messages asking the judge to rate `answer` to the question's first turn from 1 to 10.

    The reference-based prompt is used for math/reasoning/coding questions when a reference is available:
    `reference` if given, else the first entry of the question's `reference` list. (FastChat itself takes the
    reference from a GPT-4 reference-answer file; the question file's `reference` is the closest offline stand-in.)
    """
    ref = reference if reference is not None else _reference(question)
    first_turn = question["turns"][0]
    if question.get("category") in NEED_REF_CATS and ref:
        user = _WITH_REFERENCE.format(question=first_turn, reference=ref, answer=answer)
    else:
        user = _GENERAL.format(question=first_turn, answer=answer)
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def judge_prompt_second_turn(question: dict, first_answer: str, second_answer: str) -> list[dict]:
    """Chat messages asking the judge to rate the second answer, shown the whole two-turn conversation.

    math/reasoning/coding questions with two reference answers get the reference-based form (FastChat's
    "single-math-v1-multi-turn")."""
    q1, q2 = question["turns"][:2]
    refs = question.get("reference") or []
    conversation = _CONVERSATION.format(q1=q1, a1=first_answer, q2=q2, a2=second_answer)
    if question.get("category") in NEED_REF_CATS and len(refs) >= 2:
        system = _MULTI_WITH_REFERENCE
        conversation = _REFERENCE_CONVERSATION.format(q1=q1, r1=refs[0], q2=q2, r2=refs[1]) + conversation
    else:
        system = _MULTI_GENERAL
    return [{"role": "system", "content": system}, {"role": "user", "content": conversation}]


def second_turn_prompt(first_prompt: str, first_answer: str, question: dict) -> str | None:
    """The model's input for the second turn: the first turn's prompt and answer, then the second question in the
    training format (`FOLLOW_UP`) and the space the first prompt also ends with; None for a one-turn question."""
    if len(question["turns"]) < 2:
        return None
    return first_prompt + first_answer.strip() + FOLLOW_UP.format(instruction=question["turns"][1]) + " "


def parse_rating(text: str) -> float | None:
    """The judge's rating ("[[8]]", "[[7.5]]", or FastChat's fallback "[8]"), or None if it gave none."""
    match = _RATING.search(text) or _RATING_BACKUP.search(text)
    return float(match.group(1)) if match else None


def _chat(url: str, payload: dict, headers: dict, timeout_s: float, max_retries: int, retry_sleep_s: float) -> str:
    """One chat completion; retries transport errors, 429 and 5xx, raises on anything else or when out of tries."""
    body = json.dumps(payload).encode("utf-8")
    for attempt in range(max_retries + 1):
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as err:
            retryable = err.code == 429 or err.code >= 500
            if not retryable or attempt == max_retries:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == max_retries:
                raise
        time.sleep(retry_sleep_s * 2**attempt)
    raise AssertionError("unreachable")


def judge_answers(
    questions: Sequence[dict],
    answers: Sequence[str],
    endpoint: str | None,
    model: str,
    api_key_env: str = "OPENAI_API_KEY",
    timeout_s: float = 60,
    max_retries: int = 2,
    retry_sleep_s: float = 1.0,
    second_answers: Sequence[str | None] | None = None,
) -> dict:
    """Judge first-turn `answers` (and, given `second_answers`, the second turns) with `model` at
    `{endpoint}/chat/completions`, temperature 0.

    Without an endpoint nothing is judged and no score is returned. A judgment without a rating, or a request
    that fails after `max_retries` retries, counts as unrated (FastChat's rating -1, excluded from the mean);
    `score` is the mean over every rated turn (FastChat's MT-bench score), `score_turn1` / `score_turn2` per turn,
    None where nothing was rated. `ratings` etc. hold turn 1, `ratings_turn2` etc. turn 2 (None: not asked).
    """
    if len(questions) != len(answers) or (second_answers is not None and len(second_answers) != len(answers)):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers (and second turns)")
    if endpoint is None:
        return {
            "status": "not judged",
            "reason": "no judge endpoint configured; MT-bench needs an LLM judge (GPT-4 in the papers)",
            "n_answers": len(answers),
        }
    url = endpoint.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"

    def judge(messages: list[dict]) -> tuple[str | None, float | None, str | None]:
        payload = {"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, "n": 1}
        try:
            text = _chat(url, payload, headers, timeout_s, max_retries, retry_sleep_s)
        except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, IndexError, ValueError) as err:
            return None, None, f"{type(err).__name__}: {err}"
        return text, parse_rating(text), None

    first = [judge(judge_prompt(q, a)) for q, a in zip(questions, answers)]
    second = [
        judge(judge_prompt_second_turn(q, a, b)) if b is not None else (None, None, None)
        for q, a, b in zip(questions, answers, second_answers or [None] * len(answers))
    ]
    asked = len(answers) + sum(b is not None for b in second_answers or [])
    ratings = [r for _, r, _ in first] + [r for _, r, _ in second]
    errors = [e for _, _, e in first] + [e for _, _, e in second]
    mean = lambda values: sum(values) / len(values) if values else None
    rated = [r for r in ratings if r is not None]
    n_errors = sum(e is not None for e in errors)
    out = {
        "status": "failed" if asked and n_errors == asked else "judged",
        "score": mean(rated),
        "score_turn1": mean([r for _, r, _ in first if r is not None]),
        "n_rated": len(rated),
        "n_unrated": asked - len(rated),
        "n_errors": n_errors,
        "ratings": [r for _, r, _ in first],
        "judgments": [t for t, _, _ in first],
        "errors": [e for _, _, e in first],
        "model": model,
        "endpoint": endpoint,
    }
    if second_answers is not None:
        out |= {
            "score_turn2": mean([r for _, r, _ in second if r is not None]),
            "ratings_turn2": [r for _, r, _ in second],
            "judgments_turn2": [t for t, _, _ in second],
            "errors_turn2": [e for _, _, e in second],
        }
    return out


def _normalise(row: dict, index: int) -> dict:
    """FastChat question schema from either FastChat's (turns, question_id) or HF H4's (prompt, prompt_id) rows."""
    turns = row.get("turns", row.get("prompt"))
    if isinstance(turns, str):
        turns = [turns]
    if not turns:
        raise ValueError(f"MT-bench row {index} has no turns/prompt: {sorted(row)}")
    question = {
        "question_id": row.get("question_id", row.get("prompt_id", index)),
        "category": row.get("category", ""),
        "turns": list(turns),
    }
    ref = row.get("reference")
    if ref:
        question["reference"] = [ref] if isinstance(ref, str) else list(ref)
    return question


def load_mtbench_questions(path_or_dataset: str | Path, split: str = "train") -> list[dict]:
    """MT-bench questions as FastChat dicts (question_id, category, turns, optional reference).

    A path to an existing file is read as JSON lines; anything else is a Hugging Face dataset id or local dataset
    directory loaded with `datasets` (e.g. "HuggingFaceH4/mt_bench_prompts", whose prompt/prompt_id columns are
    mapped to turns/question_id; empty references are dropped).
    """
    path = Path(path_or_dataset)
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    else:
        from datasets import load_dataset  # heavy import, only needed for hub/directory datasets

        rows = list(load_dataset(str(path_or_dataset), split=split))
    return [_normalise(row, i) for i, row in enumerate(rows)]
