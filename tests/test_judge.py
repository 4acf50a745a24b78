"""The OpenAI-compatible judge client against a real local HTTP server, and the judge-scored benchmarks."""

import json
import logging
import socket

import pytest
from fake_openai import FakeServer, completion, serving

from vlsi.cli import main
from vlsi.eval import Judge, JudgeError, ScoreError, score_file
from vlsi.eval.judge import MMVET_PROMPT, WILDER_SYSTEM
from vlsi.eval.judged import score_llava_wilder, score_mm_vet, score_mm_vet_v2

SECRET = "sk-test-0123456789-secret"


class FakeEndpoint(FakeServer):
    """A judge's server: canned grades (`grade(prompt)`), the first `fail_first` calls answered with HTTP 500, every
    call past them with `status` when it is not 200."""

    def __init__(self):
        super().__init__(self._judge)
        self.fail_first = 0
        self.status = 200
        self.grade = lambda prompt: "0.5"

    def _judge(self, body):
        calls = len(self.requests)
        if calls <= self.fail_first:
            return 500, {"error": "overloaded"}, 0.0
        if self.status != 200:  # echo the Authorization header, as careless servers do: the client must not repeat it
            return self.status, {"error": f"bad key {self.requests[-1][1].get('Authorization')}"}, 0.0
        return 200, completion(self.grade(body["messages"][-1]["content"])), 0.0


@pytest.fixture
def endpoint():
    with serving(FakeEndpoint()) as state:
        yield state


def test_judge_sends_key_in_header_and_returns_content(endpoint):
    endpoint.grade = lambda prompt: f"echo: {prompt}"
    judge = Judge(url=endpoint.url, model="judge-model", api_key=SECRET)
    assert judge("grade this", temperature=0.5, system="be precise") == "echo: grade this"
    path, headers, body = endpoint.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert body["model"] == "judge-model" and body["temperature"] == 0.5
    assert body["messages"] == [
        {"role": "system", "content": "be precise"},
        {"role": "user", "content": "grade this"},
    ]
    assert SECRET not in repr(judge)


def test_judge_retries_server_errors_with_backoff(endpoint, caplog):
    endpoint.fail_first = 2
    judge = Judge(url=endpoint.url + "/chat/completions", model="m", api_key=SECRET, retries=3)
    with caplog.at_level(logging.DEBUG):
        assert judge("p") == "0.5"
    assert len(endpoint.requests) == 3  # two 500s, then success
    assert [path for path, _, _ in endpoint.requests] == ["/v1/chat/completions"] * 3  # the full address as well
    assert SECRET not in caplog.text


def test_judge_gives_up_after_bounded_retries(endpoint):
    endpoint.fail_first = 100
    judge = Judge(url=endpoint.url, model="m", api_key=SECRET, retries=2)
    with pytest.raises(JudgeError, match=r"failed 3 times \(last: HTTP 500"):
        judge("p")
    assert len(endpoint.requests) == 3


def test_judge_refused_key_fails_at_once_without_echoing_it(endpoint):
    endpoint.status = 401
    judge = Judge(url=endpoint.url, model="m", api_key=SECRET, retries=5)
    with pytest.raises(JudgeError, match="answered HTTP 401") as error:
        judge("p")
    assert len(endpoint.requests) == 1  # 4xx is not retried
    assert SECRET not in str(error.value) and "***" in str(error.value)


def test_judge_unreachable_server():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = Judge(url=f"http://127.0.0.1:{port}/v1", model="m", retries=1, timeout_s=2)
    with pytest.raises(JudgeError, match="failed 2 times"):
        judge("p")


# ---------------------------------------------------------------- judge-scored benchmarks (fake judge callables)


def fake_judge(replies):
    """A judge callable answering by the prediction inside the prompt: replies[prediction] is a reply or a list of
    replies for successive calls."""
    calls = []

    def judge(prompt, temperature=0.0, system=None):
        calls.append((prompt, temperature, system))
        for prediction, reply in replies.items():
            if f"| {prediction} |" in prompt or f"[Assistant 2]\n{prediction}\n" in prompt:
                return reply.pop(0) if isinstance(reply, list) else reply
        raise AssertionError(f"unexpected prompt {prompt[-200:]}")

    judge.calls = calls
    return judge


def mmvet_row(prediction, category):
    return {"question": "What is written?", "answer": "stop <OR> halt", "prediction": prediction, "category": category}


def test_score_mm_vet_grades_per_capability():
    replies = {"STOP": "1.0", "maybe stop": "0.5 partially right", "a cat": "no idea", "late": ["x", "0.4"]}
    rows = [
        mmvet_row("STOP", "rec,ocr"),
        mmvet_row("maybe stop", "ocr"),  # lenient: 0.5; VLMEvalKit needs the whole reply to be a number: 0.0
        mmvet_row("a cat", "math"),  # never a legible grade: 0.0 after 5 tries
        mmvet_row("late", "rec,know"),  # legible on the second try: 0.4
    ]
    judge = fake_judge({key: list(value) if isinstance(value, list) else value for key, value in replies.items()})
    result = score_mm_vet(rows, judge, rules="lenient")
    assert result["score"] == pytest.approx(100 * (1.0 + 0.5 + 0.0 + 0.4) / 4)  # 47.5
    assert result["capabilities"] == {
        "rec": pytest.approx(70.0),  # (1.0 + 0.4) / 2
        "ocr": pytest.approx(75.0),  # (1.0 + 0.5) / 2
        "know": pytest.approx(40.0),
        "math": 0.0,
    }
    assert result["capability_sets"]["rec_ocr"] == pytest.approx(100.0)
    assert result["judge_failures"] == 1
    a_cat = [t for prompt, t, _ in judge.calls if "| a cat |" in prompt]
    assert a_cat == [0.0, 0.5, 1.0, 1.5, 2.0]  # VLMEvalKit's schedule of re-asks
    prompt = next(p for p, _, _ in judge.calls if "| STOP |" in p)
    assert prompt.startswith(MMVET_PROMPT) and prompt.endswith("What is written? | stop  <OR>  halt | STOP | ")

    judge = fake_judge({key: list(value) if isinstance(value, list) else value for key, value in replies.items()})
    result = score_mm_vet(rows, judge)
    assert result["score"] == pytest.approx(100 * (1.0 + 0.0 + 0.0 + 0.4) / 4)  # 35.0
    assert result["judge_failures"] == 2
    # VLMEvalKit's table: "ocr" holds rows 1 and 2, and row 2 (category "ocr") once more as its own set
    assert result["capabilities"]["ocr"] == pytest.approx(100 * (1.0 + 0.0 + 0.0) / 3)
    assert result["capability_sets"]["ocr"] == result["capabilities"]["ocr"]


def test_score_mm_vet_v2_has_the_seq_capability():
    for rules in ("vlmevalkit", "lenient"):
        result = score_mm_vet_v2([mmvet_row("STOP", ["seq", "rec"])], fake_judge({"STOP": "0.8"}), rules=rules)
        assert result["score"] == pytest.approx(80.0)
        assert result["capabilities"] == {"rec": pytest.approx(80.0), "seq": pytest.approx(80.0)}


def test_score_llava_wilder_relative_score():
    replies = {"good": "10 8\nclose to the reference", "fair": "10, 6\nvague", "odd": "I cannot rate this"}
    rows = [
        {"question": "Describe the scene.", "answer": "A park at dusk.", "prediction": p, "category": c}
        for p, c in (("good", "daily"), ("fair", "art"), ("odd", "art"))
    ]
    judge = fake_judge(replies)
    result = score_llava_wilder(rows, judge, rules="lenient")
    assert result["score"] == pytest.approx(70.0)  # (8 + 6) / (10 + 10) x 100; the unparsable review is left out
    assert result["model_score"] == pytest.approx(70.0)  # mean 7 on a 1-10 scale, x 10
    assert result["categories"] == {"art": pytest.approx(60.0), "daily": pytest.approx(80.0)}
    assert result["judge_failures"] == 1
    assert {system for _, _, system in judge.calls} == {WILDER_SYSTEM}
    # VLMEvalKit: "10, 6" splits into three parts at single spaces; both unreadable reviews count as -1 / -1
    judge = fake_judge(replies)
    result = score_llava_wilder(rows, judge)
    assert result["score"] == pytest.approx(100 * (8 - 1 - 1) / (10 - 1 - 1))  # 75
    assert result["categories"] == {"art": pytest.approx(100.0), "daily": pytest.approx(80.0)}
    assert result["judge_failures"] == 2
    assert len(judge.calls) == 3 and {t for _, t, _ in judge.calls} == {0.2}  # asked once each


def test_both_rules_read_one_set_of_replies(tmp_path):
    # The lenient rules re-ask "odd" at 0.2 twice more; VLMEvalKit's single call is shared, not repeated.
    path = tmp_path / "wilder.jsonl"
    rows = [{"question": "Describe.", "answer": "A park.", "prediction": p} for p in ("good", "odd")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    judge = fake_judge({"good": "10 8", "odd": ["?", "?", "10 5"]})
    result = score_file("llava_wilder", path, judge)
    assert result["score"] == pytest.approx(100 * (8 - 1) / (10 - 1))  # VLMEvalKit: "?" is -1 / -1
    assert result["score_lenient"] == pytest.approx(100 * (8 + 5) / 20)
    assert len(judge.calls) == 4  # good once, odd three times (the first of them for both rules)


# ---------------------------------------------------------------- end to end: CLI -> real judge server


def run_cli(*argv):
    return main(["score", *argv])


def test_cli_scores_mm_vet_through_the_server_without_leaking_the_key(endpoint, tmp_path, monkeypatch, capsys, caplog):
    endpoint.fail_first = 1  # the first call is retried
    endpoint.grade = lambda prompt: "1.0" if prompt.endswith("| stop sign | ") else "0.0"
    path = tmp_path / "mmvet.jsonl"
    rows = [mmvet_row("stop sign", "ocr"), mmvet_row("a tree", "rec")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    with caplog.at_level(logging.WARNING):
        code = run_cli(
            "--benchmark", "MM-Vet", "--predictions", str(path),
            "--judge-url", endpoint.url, "--judge-model", "grader", "--judge-key-env", "MY_JUDGE_KEY",
        )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["score"] == pytest.approx(50.0)  # grades 1.0 and 0.0
    assert result["capabilities"] == {"ocr": 100.0, "rec": 0.0}
    assert len(endpoint.requests) == 3  # one 500, then two grades, read by both rules
    assert all(headers["Authorization"] == f"Bearer {SECRET}" for _, headers, _ in endpoint.requests)
    assert SECRET not in captured.out + captured.err + caplog.text


def test_judged_benchmark_without_judge_is_a_clear_error(tmp_path):
    path = tmp_path / "wilder.tsv"
    path.write_text("question\tanswer\tprediction\nq\ta\tp\n")
    with pytest.raises(ScoreError, match="llava_wilder is scored by an LLM judge; pass --judge-url and --judge-model"):
        score_file("LLaVA-Wilder", path)


def test_cli_unset_key_env_is_an_error(capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    argv = ["--benchmark", "mmvet", "--predictions", "x.tsv", "--judge-url", "http://127.0.0.1:9/v1"]
    assert run_cli(*argv, "--judge-model", "m", "--judge-key-env", "NO_SUCH_KEY") == 2
    assert "$NO_SUCH_KEY, which is not set" in capsys.readouterr().err
