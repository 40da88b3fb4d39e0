"""Evaluation helpers: GLUE metrics against hand-computed values, GSM8K and commonsense answer extraction on
realistic generations, and MT-bench judging against a real local OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from loralab.evals import commonsense, gsm8k, mtbench
from loralab.evals.metrics import GLUE_METRICS, classification_metrics, glue_metrics, primary_metric

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
