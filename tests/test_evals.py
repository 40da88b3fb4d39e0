"""Evaluation helpers: GLUE metrics against hand-computed values, GSM8K (strict and flexible) and commonsense answer
extraction on realistic generations, LoRA-GA's HumanEval post-processing, and MT-bench judging (both turns) against a
real local OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from loralab.evals import commonsense, gsm8k, humaneval, mtbench
from loralab.evals.metrics import GLUE_METRICS, classification_metrics, glue_metrics, primary_metric
from loralab.evals.sandbox import run_program

TOL = 1e-9  # float agreement between library metrics and the closed-form values computed here

# ---------------------------------------------------------------- GLUE metrics

# 2×2 example: TP = 4 (idx 0,2,3,7), FN = 2 (idx 1,9), FP = 1 (idx 5), TN = 3 (idx 4,6,8)
REFS = [1, 1, 1, 1, 0, 0, 0, 1, 0, 1]
PREDS = [1, 0, 1, 1, 0, 1, 0, 1, 0, 0]
TP, FN, FP, TN = 4, 2, 1, 3


def test_matthews_matches_confusion_matrix_formula():
    mcc = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))  # 10/sqrt(600)
    out = glue_metrics("cola", PREDS, REFS)
    assert set(out) == {"matthews_correlation"}
    assert abs(out["matthews_correlation"] - mcc) < TOL
    assert abs(mcc - 0.408248290463863) < 1e-12


def test_accuracy_and_binary_f1_of_class_one():
    f1_pos = 2 * TP / (2 * TP + FP + FN)  # 8/11
    f1_neg = 2 * TN / (2 * TN + FN + FP)  # 6/9: what F1 of the wrong class would give
    for task in ("mrpc", "qqp"):
        out = glue_metrics(task, PREDS, REFS)
        assert set(out) == {"accuracy", "f1"}
        assert abs(out["accuracy"] - 0.7) < TOL
        assert abs(out["f1"] - f1_pos) < TOL
        assert abs(out["f1"] - f1_neg) > 0.05
    for task in ("sst2", "mnli", "mnli_mismatched", "qnli", "rte", "wnli"):
        assert glue_metrics(task, PREDS, REFS) == {"accuracy": pytest.approx(0.7, abs=TOL)}


def test_stsb_pearson_and_spearman_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 50.0])  # same ranks as [2, 1, 4, 3, 5], very different values
    dx, dy = x - x.mean(), y - y.mean()
    pearson = float((dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum()))
    # ranks of x are 1..5, of y are 2,1,4,3,5: centred rank products sum to 8 over a rank variance of 10
    spearman = 8 / 10
    out = glue_metrics("stsb", list(x), list(y))
    assert set(out) == {"pearson", "spearmanr"}
    assert abs(out["pearson"] - pearson) < TOL
    assert abs(out["spearmanr"] - spearman) < TOL
    assert abs(out["pearson"] - out["spearmanr"]) > 0.05  # the example separates the two


def test_classification_metrics_macro_f1_by_hand():
    refs, preds = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 4/5, class 2: 2/3
    macro = (2 / 4 + 4 / 5 + 2 / 3) / 3
    out = classification_metrics(preds, refs)
    assert abs(out["accuracy"] - 4 / 6) < TOL
    assert abs(out["macro_f1"] - macro) < TOL


def test_primary_metric_conventions_and_bad_input():
    assert primary_metric("cola") == "matthews_correlation"
    assert primary_metric("stsb") == "pearson"
    assert primary_metric("mrpc") == "accuracy" and primary_metric("qqp") == "accuracy"
    for task in GLUE_METRICS:  # the LoRA convention always names a metric glue_metrics returns
        assert primary_metric(task) in GLUE_METRICS[task]
    assert primary_metric("cola", convention="loraga") == "accuracy"
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("squad", PREDS, REFS)
    with pytest.raises(ValueError, match="equal-length"):
        glue_metrics("sst2", PREDS, REFS[:-1])
    with pytest.raises(ValueError, match="convention"):
        primary_metric("cola", convention="gpt")


# ---------------------------------------------------------------- GSM8K

GSM8K_CASES = [
    # (completion, LoRA-GA's strict extraction, lm-eval's flexible-extract before normalisation)
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72", 72, "72"),
    ("In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72 in total.\nThe answer is: 72", None, "72"),
    ("Total minutes: 18 * 60 = 1,080.\n#### 1,080", 1, "1,080"),  # official: digits only
    ("Profit is 2,000 - 765.50 = $1,234.50\n#### $1,234.50", None, "$1,234.50"),
    ("The temperature drops 5 degrees from 2, so it is 2 - 5 = -3.\n#### -3", None, "-3"),
    ("It takes 5 / 2 = 2.5 hours.\n#### 2.5 hours", 2, "2.5"),
    ("She has 5 apples and buys 7 more, so she has 12 apples.", None, "12"),  # flexible: the last number
    ("#### eighteen", None, None),
    ("So the answer is 18 dollars.\n#### 18.", 18, "18."),
    ("#### 72\n\nQ: Tom has 3 apples and buys 2 more. How many?\nA: 3 + 2 = 5\n#### 5", 72, "5"),  # first vs last
    ("x = 3, y = 4", None, "4"),
    ("#### \n 250", 250, "250"),
]


@pytest.mark.parametrize(("completion", "strict", "flexible"), GSM8K_CASES)
def test_gsm8k_strict_and_flexible_extraction(completion, strict, flexible):
    assert gsm8k.strict_answer(completion) == strict
    assert gsm8k.flexible_answer(completion) == flexible


def test_gsm8k_correctness_rules_and_prompts():
    ref = "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"
    assert gsm8k.strict_correct("so $10.\n#### 10", ref) and gsm8k.flexible_correct("so $10.\n#### 10", ref)
    assert not gsm8k.strict_correct("The answer is 10", ref) and gsm8k.flexible_correct("The answer is $10.", ref)
    thousands = "18 * 60 = 1,080 minutes\n#### 1080"
    assert gsm8k.flexible_correct("That is 1,080.", thousands) and not gsm8k.strict_correct("#### 1,080", thousands)
    assert not gsm8k.flexible_correct("#### 10.0", ref)  # lm-eval compares strings, not numbers
    # the official quirk: a completion without "#### <digits>" reads as 0 and so matches a reference of 0
    assert gsm8k.strict_correct("I cannot tell.", "0 - 0 = 0\n#### 0")
    assert not gsm8k.flexible_correct("I cannot tell.", "0 - 0 = 0\n#### 0")
    assert gsm8k.prompt("How many?") == "Q: How many?\nA: "
    assert gsm8k.eval_prompt("How many?") == "Q: How many?\nA:  "  # official model_inference: input_text + " "
    assert gsm8k.metamath_target("x = 3\n#### 3\nThe answer is: 3") == "x = 3\n#### 3"


def test_gsm8k_scores_and_headline():
    completions = [case[0] for case in GSM8K_CASES[:6]]
    refs = ["...\n#### 72", "...\n#### 72", "...\n#### 1080", "...\n#### 1234.50", "...\n#### -3", "#### 5"]
    out = gsm8k.gsm8k_scores(completions, refs)
    # strict: "#### -3" reads as 0 on both sides (the official digits-only regex), so it counts as correct
    assert out["strict"] == [True, False, False, False, True, False]
    assert out["flexible"] == [True, True, True, True, True, False]
    assert out["strict_match"] == pytest.approx(2 / 6) and out["flexible_extract"] == pytest.approx(5 / 6)
    assert out["n"] == 6 and out["n_no_answer"] == 3
    metrics = gsm8k.gsm8k_metrics(completions, refs)
    assert metrics["accuracy"] == metrics["strict_match"]  # the official rule is the headline
    assert gsm8k.gsm8k_metrics(completions, refs, "flexible")["accuracy"] == metrics["flexible_extract"]
    with pytest.raises(ValueError, match="headline"):
        gsm8k.gsm8k_metrics(completions, refs, "lenient")
    with pytest.raises(ValueError, match="####"):
        gsm8k.gsm8k_scores(["#### 1"], ["no final answer line"])
    with pytest.raises(ValueError):
        gsm8k.gsm8k_scores(completions, refs[:-1])


# ---------------------------------------------------------------- commonsense

CHOICE_CASES = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, because the passage says it is not true", "false"),
    ("boolq", "True", None),  # the official regex is case-sensitive
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution1 is better than solution2", "solution1"),
    ("siqa", "the correct answer is answer3", "answer3"),
    ("siqa", "answer4", "answer4"),  # official SIQA pattern is answer1..answer5
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending5", None),
    ("winogrande", "the correct answer is option2", "option2"),
    ("arc_e", "the correct answer is answer1", "answer1"),
    ("arc_c", "Answer: answer4.", "answer4"),
    ("obqa", "the correct answer is answer2", "answer2"),
    ("obqa", "I am not sure.", None),
    ("ARC-Challenge", "answer3", "answer3"),  # LLM-Adapters dataset names are accepted too
    ("social_i_qa", "answer2", "answer2"),
]


@pytest.mark.parametrize(("task", "response", "expected"), CHOICE_CASES)
def test_commonsense_extraction(task, response, expected):
    assert commonsense.extract_choice(task, response) == expected


def test_commonsense_accuracy_prompt_and_tasks():
    assert commonsense.COMMONSENSE_TASKS == [
        "boolq",
        "piqa",
        "siqa",
        "hellaswag",
        "winogrande",
        "arc_e",
        "arc_c",
        "obqa",
    ]
    responses = ["the correct answer is option1", "option2", "no idea", "option1"]
    assert (
        commonsense.commonsense_accuracy("winogrande", responses, ["option1", "option1", "option2", "option1"]) == 0.5
    )
    with pytest.raises(ValueError):
        commonsense.extract_choice("mmlu", "answer1")
    clean = commonsense.prompt("Is water wet?")
    assert clean == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIs water wet?\n\n### Response:\n"
    )
    verbatim = commonsense.prompt("Is water wet?", verbatim=True)
    assert "request. \n\n" + " " * 16 + "### Instruction:\n" + " " * 16 + "Is water wet?\n\n" in verbatim
    assert verbatim.endswith("### Response:\n" + " " * 16)
    assert commonsense.response_text(verbatim + "the correct answer is true\n") == "the correct answer is true"


# ---------------------------------------------------------------- MT-bench

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a travel blog post about Hawaii.", "Rewrite it."]},
    {"question_id": 111, "category": "math", "turns": ["What is 7 * 6?", "And 7 * 7?"], "reference": ["42", "49"]},
    {"question_id": 131, "category": "coding", "turns": ["Reverse a string in Python.", "In C?"]},
]


@pytest.mark.parametrize(
    ("text", "rating"),
    [
        ("The answer is helpful and accurate.\n\nRating: [[8]]", 8.0),
        ("Rating: [[7.5]]", 7.5),
        ("Rating: [8]", 8.0),  # FastChat's single-bracket fallback
        ("A sound answer. [3] was cited, but final Rating: [[9]]", 9.0),  # double brackets take precedence
        ("I would rate this 8 out of 10.", None),
        ("Rating: [[8/10]]", None),
    ],
)
def test_parse_rating(text, rating):
    assert mtbench.parse_rating(text) == rating


def test_judge_prompt_variants():
    general = mtbench.judge_prompt(QUESTIONS[0], "Aloha!")
    assert [m["role"] for m in general] == ["system", "user"]
    assert "Write a travel blog post about Hawaii." in general[1]["content"] and "Aloha!" in general[1]["content"]
    assert '"[[rating]]"' in general[1]["content"] and "Rewrite it." not in general[1]["content"]
    assert "Reference Answer" not in general[1]["content"]
    math_msgs = mtbench.judge_prompt(QUESTIONS[1], "It is 42.")
    assert "[The Start of Reference Answer]\n42\n[The End of Reference Answer]" in math_msgs[1]["content"]
    assert "Reference Answer" not in mtbench.judge_prompt(QUESTIONS[2], "s[::-1]")[1]["content"]  # no reference
    explicit = mtbench.judge_prompt(QUESTIONS[2], "s[::-1]", reference="def rev(s): return s[::-1]")
    assert "def rev(s): return s[::-1]" in explicit[1]["content"]
    writing_with_ref = dict(QUESTIONS[0], reference=["a model post"])
    assert "Reference Answer" not in mtbench.judge_prompt(writing_with_ref, "Aloha!")[1]["content"]


def test_no_endpoint_is_not_judged_and_has_no_score():
    out = mtbench.judge_answers(QUESTIONS, ["a", "b", "c"], endpoint=None, model="gpt-4")
    assert out["status"] == "not judged" and out["n_answers"] == 3 and out["reason"]
    assert "score" not in out


class _Judge(BaseHTTPRequestHandler):
    """Minimal OpenAI-compatible chat endpoint; `reply(content) -> (status, text)` picks the answer."""

    requests: list[dict] = []
    reply = None

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        ok_schema = (
            self.path == "/v1/chat/completions"
            and isinstance(body.get("model"), str)
            and body.get("temperature") == 0
            and [m["role"] for m in body.get("messages", [])] == ["system", "user"]
            and all(isinstance(m["content"], str) for m in body["messages"])
        )
        status, text = (400, "bad request") if not ok_schema else type(self).reply(body["messages"][1]["content"])
        payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        data = json.dumps(payload if status == 200 else {"error": text}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def judge_server():
    _Judge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_judge_round_trip_parses_and_averages(judge_server, monkeypatch):
    monkeypatch.setenv("LORALAB_TEST_JUDGE_KEY", "test-key")
    failed_once: set[str] = set()

    def reply(content):
        if "Hawaii" in content:
            return 200, "Vivid and well organised.\n\nRating: [[8]]"
        if "7 * 6" in content:
            assert "[The Start of Reference Answer]\n42" in content
            if "math" not in failed_once:  # first attempt fails transiently: the client must retry
                failed_once.add("math")
                return 503, "overloaded"
            return 200, "Correct, matches the reference. Rating: [6.5]"
        return 200, "The code is fine but I will not give a number."

    _Judge.reply = staticmethod(reply)
    out = mtbench.judge_answers(
        QUESTIONS,
        ["Aloha from Maui ...", "7 * 6 = 42", "s[::-1]"],
        endpoint=judge_server,
        model="judge-x",
        api_key_env="LORALAB_TEST_JUDGE_KEY",
        timeout_s=10,
        max_retries=2,
        retry_sleep_s=0,
    )
    assert out["status"] == "judged"
    assert out["ratings"] == [8.0, 6.5, None]
    assert out["n_rated"] == 2 and out["n_unrated"] == 1 and out["n_errors"] == 0
    assert out["score"] == pytest.approx((8.0 + 6.5) / 2, abs=1e-12)
    assert len(_Judge.requests) == 4  # three questions plus one retry
    for request in _Judge.requests:
        assert request["auth"] == "Bearer test-key"
        assert request["body"]["model"] == "judge-x" and request["body"]["temperature"] == 0


def test_judge_without_ratings_gives_no_score(judge_server):
    _Judge.reply = staticmethod(lambda content: (200, "This answer is good."))
    out = mtbench.judge_answers(QUESTIONS[:2], ["x", "y"], endpoint=judge_server + "/", model="judge-x")
    assert out["status"] == "judged" and out["score"] is None
    assert out["n_rated"] == 0 and out["n_unrated"] == 2 and out["ratings"] == [None, None]


def test_judge_unreachable_endpoint_fails_without_score():
    probe = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens on this port now
    out = mtbench.judge_answers(
        QUESTIONS[:1], ["x"], endpoint=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, retry_sleep_s=0
    )
    assert out["status"] == "failed" and out["score"] is None and out["n_errors"] == 1
    assert out["errors"][0].startswith("URLError")


def test_load_mtbench_questions_both_schemas(tmp_path):
    fastchat = tmp_path / "question.jsonl"
    fastchat.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    assert mtbench.load_mtbench_questions(fastchat) == QUESTIONS
    h4_rows = [
        {"prompt": ["What is 7 * 6?", "And 7 * 7?"], "prompt_id": 123, "category": "math", "reference": ["42", "49"]},
        {"prompt": ["Write a poem.", "Shorter."], "prompt_id": 456, "category": "writing", "reference": []},
    ]
    h4_dir = tmp_path / "h4"
    h4_dir.mkdir()
    (h4_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in h4_rows) + "\n")
    expected = [
        {"question_id": 123, "category": "math", "turns": ["What is 7 * 6?", "And 7 * 7?"], "reference": ["42", "49"]},
        {"question_id": 456, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
    ]
    assert mtbench.load_mtbench_questions(h4_dir / "train.jsonl") == expected
    assert mtbench.load_mtbench_questions(h4_dir) == expected  # via `datasets`, as for a hub id


def test_second_turn_prompt_and_judge_prompt():
    first_prompt = "### Instruction:\nWrite a travel blog post about Hawaii.\n\n### Response:\n "
    second = mtbench.second_turn_prompt(first_prompt, " Aloha from Maui!\n", QUESTIONS[0])
    assert second == first_prompt + "Aloha from Maui!\n\n### Instruction:\nRewrite it.\n\n### Response:\n "
    assert mtbench.second_turn_prompt(first_prompt, "x", dict(QUESTIONS[0], turns=["one turn"])) is None
    system, user = mtbench.judge_prompt_second_turn(QUESTIONS[0], "Aloha!", "Shorter aloha.")
    assert [system["role"], user["role"]] == ["system", "user"] and "second user question" in system["content"]
    for text in ("Write a travel blog post about Hawaii.", "Aloha!", "Rewrite it.", "Shorter aloha."):
        assert text in user["content"]
    assert user["content"].index("Aloha!") < user["content"].index("Rewrite it.") < user["content"].index("Shorter")
    _, math_user = mtbench.judge_prompt_second_turn(QUESTIONS[1], "42", "49")
    assert "### Reference answer:\n42" in math_user["content"] and "### Reference answer:\n49" in math_user["content"]
    _, code_user = mtbench.judge_prompt_second_turn(QUESTIONS[2], "s[::-1]", "strrev")  # no references
    assert "Reference answer" not in code_user["content"]


def test_judge_both_turns_round_trip(judge_server):
    """Both turns reach the judge over HTTP; the score is the mean over every rated turn (FastChat's)."""

    def reply(content):
        if "Conversation with User" in content:  # a second-turn request: the whole conversation
            return 200, "Rating: [[4]]" if "Rewrite it." in content else "No number."
        return 200, "Rating: [[8]]"

    _Judge.reply = staticmethod(reply)
    out = mtbench.judge_answers(
        QUESTIONS,
        ["Aloha!", "42", "s[::-1]"],
        endpoint=judge_server,
        model="judge-x",
        second_answers=["Shorter.", "49", None],  # the third question's second turn was not generated
    )
    assert len(_Judge.requests) == 5  # three first turns, two second turns
    conversations = [r["body"]["messages"][1]["content"] for r in _Judge.requests[3:]]
    assert "Aloha!" in conversations[0] and "Shorter." in conversations[0] and "49" in conversations[1]
    assert out["ratings"] == [8.0, 8.0, 8.0] and out["ratings_turn2"] == [4.0, None, None]
    assert out["score_turn1"] == 8.0 and out["score_turn2"] == 4.0
    assert out["score"] == pytest.approx((3 * 8.0 + 4.0) / 4) and out["n_rated"] == 4 and out["n_unrated"] == 1


def test_mtbench_job_sends_both_turns_to_the_judge(judge_server, tmp_path):
    """The loraga_llama MT-bench smoke job with a judge: the tiny model answers both turns, every turn reaches the
    local HTTP judge, the answers file holds both turns and the score is their mean."""
    from loralab.runner import run_job
    from loralab.smoke import compose_job, smoke_jobs

    _Judge.reply = staticmethod(lambda content: (200, "Rating: [[3]]" if "Conversation" in content else "[[7]]"))
    job = next(j for j in smoke_jobs("loraga_llama", tmp_path) if "task=wizardlm_mtbench" in j)
    overrides = [*job, f"task.judge.endpoint={judge_server}", "task.judge.model=judge-x"]
    record = run_job(compose_job("loraga_llama", overrides), overrides=overrides, raise_errors=True)
    answers = [json.loads(line) for line in (tmp_path / "results" / record.run_dir / "eval" / "mtbench_answers.jsonl")
               .read_text().splitlines()]  # fmt: skip
    assert len(answers) == 2 and all(len(a["turns"]) == 2 for a in answers)
    second = [r["body"]["messages"][1]["content"] for r in _Judge.requests if "Conversation" in str(r["body"])]
    assert len(_Judge.requests) == 4 and len(second) == 2
    for answer, request in zip(answers, second):  # the judge saw the model's own answers to both turns
        assert answer["turns"][0].strip() in request and answer["turns"][1].strip() in request
    assert record.metrics["test/mtbench_status"] == "judged"
    assert record.metrics["test/mtbench_score_turn1"] == 7.0 and record.metrics["test/mtbench_score_turn2"] == 3.0
    assert record.metrics["test/mtbench_score"] == pytest.approx(5.0)


# ---------------------------------------------------------------- HumanEval: LoRA-GA's post-processing

POST_PROCESS_CASES = [
    # (completion, official post_process result)
    (  # fences and the docstring go, the function moves to column 0
        '    def add(a, b):\n        """Add two numbers."""\n        return a + b\n```\n',
        "def add(a, b):\n    return a + b",
    ),
    ("def f(x):\n\tif x:\n\t\treturn 1\n\treturn 0", "def f(x):\n    if x:\n        return 1\n    return 0"),  # tabs
    (  # two- and five-space indents become levels 1 and 2; blank lines and trailing spaces go
        "def f(x):  \n\n  y = x\n  if y:\n     return y\n  return 0\n\n",
        "def f(x):\n    y = x\n    if y:\n        return y\n    return 0",
    ),
    ("    return a + b\n", "    return a + b"),  # no def line: indents above column 0 are levels
    (  # theirs finds the first line *containing* "def": here "undefined" sets the base indent
        "    x = undefined_name\n  def g():\n      return 1",
        "x = undefined_name\ndef g():\n    return 1",
    ),
    ("def h():\n    '''single-quoted\n    docstring'''\n    return 2", "def h():\n    return 2"),
    ("def f():\n    return 1\n```\nThis returns 1.", "def f():\n    return 1\nThis returns 1."),  # prose stays
    ("", ""),
]


@pytest.mark.parametrize(("completion", "expected"), POST_PROCESS_CASES)
def test_official_post_process(completion, expected):
    assert humaneval.official_post_process(completion) == expected


DOUBLE = {
    "task_id": "Toy/2",
    "prompt": 'def double(x):\n    """Twice x."""\n',
    "canonical_solution": "    return 2 * x\n",
    "test": "def check(candidate):\n    assert candidate(3) == 6\n",
    "entry_point": "double",
}


def test_humaneval_scoring_with_official_and_first_block_extraction():
    completions = {
        "Toy/2": [
            '    def double(x):\n\t\t"""Twice."""\n\t\treturn 2 * x\n```',  # passes after their post_process
            "def double(x):\n    return 2 * x\n```\nThis doubles x.",  # the prose after the fence is kept: fails
        ]
    }
    assert humaneval.solution_code(completions["Toy/2"][0], DOUBLE) == DOUBLE["prompt"] + (
        "def double(x):\n    return 2 * x"
    )
    official = humaneval.score_samples([DOUBLE], completions)
    assert official["per_task"][0]["statuses"] == ["passed", "failed"] and official["pass@1"] == 0.5
    first_block = humaneval.score_samples([DOUBLE], completions, extraction="first_block")
    assert first_block["per_task"][0]["statuses"][1] == "passed"
    with pytest.raises(ValueError, match="extraction 'regex'"):
        humaneval.solution_code("x", DOUBLE, "regex")


def test_execution_limit_excludes_start_up_and_is_reported_as_timeout():
    slow = run_program("import time\ntime.sleep(0.3)\n", timeout_s=20, exec_timeout_s=3.0)
    assert slow.status == "passed"
    looping = run_program("while True:\n    pass\n", timeout_s=20, exec_timeout_s=1.0)
    assert looping.status == "timeout" and looping.duration_s < 10
    caught = run_program(
        "try:\n    while True:\n        pass\nexcept BaseException:\n    pass\n", 20, exec_timeout_s=1.0
    )
    assert caught.status == "timeout"  # the limit is not an exception the program can swallow
