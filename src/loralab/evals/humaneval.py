"""HumanEval pass@k under LoRA-GA's protocol: Alpaca prompt, code extraction, sandboxed execution, unbiased pass@k.

LoRA-GA (reproduce/eval_humaneval.py) asks for the *entire* function in the Alpaca no-input format, with the
response already opened as a ```python block (their `model_inference` appends one more space to the prompt); it
samples 5 completions per task (T=0.8, top-p 0.95), cleans each with `post_process` and scores them with OpenAI's
human-eval harness: program = prompt + completion + test + `check(entry_point)`, a sample passes iff that program
runs to its end within 3 s of execution, and pass@k is the unbiased estimator averaged over tasks.

Code extraction, `extraction=`: `official` (default) is their `post_process` (`official_post_process`);
`first_block` (`extract_code`) keeps the code before the first fence or the first fenced block, for completions
that go on with prose or more code after the solution.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loralab.evals.sandbox import run_program

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

# LoRA-GA's evaluation prompt, verbatim in effect (including the space after the first newline): the model answers
# inside an already opened ```python block
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task.\n Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nComplete the following Python code: \n"
    "Notes: respond with the entire complete function definition\n"
    "do not add any comments, be as concise in your code as possible\n"
    "use only built-in libraries, assume no additional imports other than those provided (if any)\n"
    "use `    ` (4 spaces) for each level of indentation\n\n"
    "code:\n```python\n{prompt}\n```\n\n### Response:\n```python\n"
)

_LEADING_WS = re.compile(r"^[ \t]+", re.MULTILINE)


EXTRACTIONS = ("official", "first_block")
START_HEADROOM_S = 5.0  # wall-clock allowance for the sandboxed interpreter's start-up, beyond the execution limit


def build_prompt(problem_prompt: str) -> str:
    """The text given to the model for one HumanEval problem, with the space `model_inference` appends."""
    return PROMPT_TEMPLATE.format(prompt=problem_prompt) + " "


def official_post_process(text: str) -> str:
    """LoRA-GA's `post_process`, rule for rule (hand-written: no library has it).

    Every ``` removed; tabs become 4 spaces; every triple-quoted string (docstrings) removed; blank lines dropped
    and trailing spaces stripped; then re-indented: the first line containing "def" (anywhere, as theirs) sets the
    base, indents at or left of it go to column 0, each deeper distinct indent width is one more 4-space level."""
    text = text.replace("```", "").replace("\t", "    ")
    text = re.sub(r'(""".*?"""|\'\'\'.*?\'\'\')', "", text, flags=re.DOTALL)
    lines = [line.rstrip() for line in text.splitlines() if line.strip()] or [""]
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    def_line = next((i for i, line in enumerate(lines) if "def" in line), None)
    base = indents[def_line] if def_line is not None else 0
    deeper = sorted({w for w in indents if w > base})
    level = {w: 0 for w in indents if w <= base} | {w: i + 1 for i, w in enumerate(deeper)}
    return "\n".join("    " * level[w] + line.lstrip() for line, w in zip(lines, indents))


def solution_code(completion: str, problem: dict, extraction: str = "official") -> str:
    """What runs before the tests: human-eval's prompt + completion, the completion cleaned by `extraction`."""
    if extraction == "official":
        return problem["prompt"] + official_post_process(completion)
    if extraction == "first_block":
        return extract_code(completion, problem["prompt"], problem["entry_point"])
    raise ValueError(f"HumanEval extraction {extraction!r}; choose one of {list(EXTRACTIONS)}")


def extract_code(completion: str, prompt: str, entry_point: str) -> str:
    """Runnable solution code from a model completion (extraction `first_block`).

    1. Which text is the code. No ``` at all: the whole completion. Code before the first ``` that, after the
       prompt, compiles: that text (our prompt already opened the ```python block, the model closed it; what
       follows is prose). Otherwise the first fenced block: from the line after the first ``` to the next ```
       (or the end). This matches the Code-Feedback training answers, which keep only their first code block.
    2. Tabs in indentation become 4 spaces (as LoRA-GA's post-processing; tabs inside strings are kept).
    3. The problem prompt always goes first, as in human-eval's prompt + completion: it carries the imports
       (`from typing import List`) and helper functions the instruction says to assume. If the code defines
       `entry_point` itself (a full function, what LoRA-GA asks for), it is dedented to column 0 and its
       definition replaces the prompt's stub; otherwise it is a body continuing the prompt's signature and is
       appended unchanged.
    """
    first = completion.find("```")
    if first < 0:
        return _assemble(completion, prompt, entry_point)
    before = completion[:first]
    if before.strip():
        solution = _assemble(before, prompt, entry_point)
        if _compiles(solution):
            return solution
    newline = completion.find("\n", first)  # the block starts after the ```python line
    start = newline + 1 if newline >= 0 else len(completion)
    end = completion.find("```", start)
    return _assemble(completion[start : end if end >= 0 else len(completion)], prompt, entry_point)


def _assemble(code: str, prompt: str, entry_point: str) -> str:
    code = _LEADING_WS.sub(lambda m: m.group(0).replace("\t", "    "), code).strip("\n")
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    full = textwrap.dedent(code)
    if re.search(rf"^(async\s+)?def\s+{re.escape(entry_point)}\s*\(", full, re.MULTILINE):
        return f"{head}\n{full}\n"
    return f"{head}{code}\n"


def _compiles(source: str) -> bool:
    try:
        compile(source, "<completion>", "exec")
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


def build_program(problem: dict, code: str) -> str:
    """The program whose clean run means the sample passed: solution, the task's tests, and the check call."""
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, exact to float precision.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_samples(
    problems: list[dict],
    completions: dict[str, list[str]],
    k: Sequence[int] = (1,),
    timeout_s: float = 3.0,
    workers: int = 1,
    memory_mb: int = 1024,
    extraction: str = "official",
) -> dict:
    """Execute every completion against its problem's tests in the sandbox; mean pass@k over problems.

    Each problem needs at least one completion (as human-eval, unattempted problems are an error). pass@k is
    reported only for k <= the smallest number of samples of any problem (human-eval skips the others).
    `timeout_s` per sample limits the program's execution, as human-eval's `timeout` (3 s); the interpreter's
    start-up gets START_HEADROOM_S more of wall clock.
    """
    by_id = {p["task_id"]: p for p in problems}
    unknown = set(completions) - set(by_id)
    missing = [t for t in by_id if not completions.get(t)]
    if unknown or missing:
        raise ValueError(f"completions for unknown tasks {sorted(unknown)}; no completions for {missing}")
    jobs = [
        (task_id, build_program(p, solution_code(c, p, extraction)))
        for task_id, p in by_id.items()
        for c in completions[task_id]
    ]

    def run(job):
        return run_program(
            job[1],
            timeout_s=timeout_s + START_HEADROOM_S,
            exec_timeout_s=timeout_s,
            memory_mb=memory_mb,
            module_name="__humaneval__",
        )

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # the work happens in subprocesses
        results = list(pool.map(run, jobs))
    statuses: dict[str, list[str]] = {t: [] for t in by_id}
    for (task_id, _), result in zip(jobs, results):
        statuses[task_id].append(result.status)
    per_task = [{"task_id": t, "n": len(s), "passed": s.count("passed"), "statuses": s} for t, s in statuses.items()]
    n_min = min(row["n"] for row in per_task)
    from loralab import metric_modules  # noqa: PLC0415  (its pass_at_k module imports this one)

    outcomes = [[status == "passed" for status in row["statuses"]] for row in per_task]
    scores = metric_modules.load("pass_at_k").compute(predictions=outcomes, k=[kk for kk in k if kk <= n_min])
    return {**scores, "n_tasks": len(per_task), "per_task": per_task}


def load_humaneval(dataset: str = "openai/openai_humaneval", data_dir: str | None = None) -> list[dict]:
    """The 164 problems as dicts with FIELDS, from the hub (or its cache) or a local copy.

    `data_dir`: a `datasets.save_to_disk` directory (DatasetDict with a "test" split, or a Dataset), a directory
    with test.jsonl / test.parquet, or such a file itself (also OpenAI's HumanEval.jsonl.gz).
    """
    if data_dir is None:
        from datasets import load_dataset

        rows = list(load_dataset(dataset)["test"])
    else:
        rows = _load_local(Path(data_dir))
    for row in rows:
        absent = [f for f in FIELDS if f not in row]
        if absent:
            raise ValueError(f"HumanEval row {row.get('task_id', '?')} lacks {absent}")
    return [{f: row[f] for f in FIELDS} for row in rows]


def _load_local(path: Path) -> list[dict]:
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            from datasets import DatasetDict, load_from_disk

            data = load_from_disk(str(path))
            return list(data["test"] if isinstance(data, DatasetDict) else data)
        found = [path / n for n in ("test.jsonl", "test.parquet", "HumanEval.jsonl", "HumanEval.jsonl.gz")]
        found = [p for p in found if p.exists()]
        if not found:
            raise FileNotFoundError(f"{path}: no dataset_dict.json, test.jsonl, test.parquet or HumanEval.jsonl")
        path = found[0]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
