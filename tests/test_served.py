"""A served teacher answers the prompts (data.answers=server): against `transformers serve` of the demo teacher
(the answers equal the local teacher's greedy ones, and `vlsi sft` trains on them), and against a small local HTTP
server for what a real one does not do on demand (timeouts, 5xx, malformed replies, refusals, cut answers)."""

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fake_openai import FakeServer, completion, serving
from PIL import Image
from transformers import AutoModelForImageTextToText

from vlsi import demo
from vlsi.cli import main
from vlsi.config import ConfigError, load_config
from vlsi.data import read_dataset
from vlsi.eval.generate import Item, generate_answers, load_image
from vlsi.models.loading import load_processor
from vlsi.runfolder import FolderError
from vlsi.stages.samples import load_samples
from vlsi.toy import write_digits_dataset

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml")
TEACHER = str(Path(demo.__file__).parent.parent / "assets" / "demo" / "teacher")
STUDENT = str(Path(TEACHER).parent / "student")
SECRET = "sk-served-0123456789-secret"
TWO_IMAGES = "digit-pair"


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """Six digit questions without answers, one record with two images, and one answered record."""
    root = tmp_path_factory.mktemp("questions")
    records = json.loads(write_digits_dataset(root, n=7).read_text())
    for record in records[:6]:
        record["conversations"] = record["conversations"][:1]
    records.append(
        {
            "id": TWO_IMAGES,
            "image": ["images/digit_00000.png", "images/digit_00001.png"],
            "conversations": [{"from": "human", "value": "<image>\nfirst, then <image>\nwhich digit is larger?"}],
        }
    )
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cfg(questions, out, url, *overrides, model="teacher"):
    settings = [
        f"data.path={questions}",
        "data.answers=server",
        f"data.answer_server={url}",
        f"data.answer_model={model}",
        "data.answer_max_tokens=8",
        "data.answer_retries=0",
        *overrides,
    ]
    return load_config(CONFIG, settings, output=str(out))


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "answers" / "answers.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- a small local server, for the faults


@pytest.fixture
def fake():
    with serving(FakeServer(lambda body: (200, completion(f"answer to {_text(body)}"), 0.0))) as state:
        yield state


def _text(body) -> str:
    """The prompt's text of a chat completion request."""
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def _chats(state: FakeServer) -> list[dict]:
    return [body for path, _, body in state.requests if path == "/v1/chat/completions"]


def test_requests_carry_the_images_in_order_greedy_and_the_key_in_the_header(fake, questions, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    cfg = _cfg(questions, tmp_path / "out", fake.url, "data.answer_key_env=TEACHER_KEY", "data.answer_max_tokens=5")
    samples = load_samples(cfg)

    by_id = {s.id: s for s in samples}
    assert len(samples) == 8 and len(_chats(fake)) == 7  # the answered record is not sent
    assert {headers["Authorization"] for _, headers, _ in fake.requests} == {f"Bearer {SECRET}"}
    assert fake.requests[0][0] == "/v1/models"  # checked before any prompt
    sent = {_text(body): body for body in _chats(fake)}
    pair = by_id[TWO_IMAGES]
    body = sent["first, then which digit is larger?"]
    assert body["model"] == "teacher" and body["temperature"] == 0 and body["max_tokens"] == 5
    [message] = body["messages"]
    assert message["role"] == "user"
    kinds = [part["type"] for part in message["content"]]
    assert kinds == ["image_url", "text", "image_url", "text"]  # where the record places them
    for part, image_path in zip([p for p in message["content"] if p["type"] == "image_url"], pair.images):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        sent_image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert sent_image.format == "PNG"
        assert np.array_equal(np.asarray(sent_image), np.asarray(load_image(image_path)))
    assert pair.messages[-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "answer to first, then which digit is larger?"}],
    }
    index = json.loads((tmp_path / "out" / "answers" / "index.json").read_text())
    assert index["teacher"] == f"teacher served at {fake.url}" and index["processor"] is None
    assert SECRET not in json.dumps(index) + (tmp_path / "out" / "answers" / "answers.jsonl").read_text()


def test_no_key_env_sends_a_dummy_key(fake, questions, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("UNSET_KEY", raising=False)
    load_samples(_cfg(questions, tmp_path / "a", fake.url))
    assert {headers["Authorization"] for _, headers, _ in fake.requests} == {"Bearer EMPTY"}
    with caplog.at_level(logging.WARNING, logger="vlsi"):
        load_samples(_cfg(questions, tmp_path / "b", fake.url, "data.answer_key_env=UNSET_KEY"))
    assert "data.answer_key_env=UNSET_KEY: that variable is not set; no API key is sent" in caplog.text


def test_server_errors_are_retried_then_answered(fake, questions, tmp_path):
    failures = {}

    def flaky(body):  # each prompt fails twice with 503, then is answered
        prompt = json.dumps(body["messages"])
        with fake.lock:
            failures[prompt] = count = failures.get(prompt, 0) + 1
        return (503, {"error": "overloaded"}, 0.0) if count <= 2 else (200, completion("ok"), 0.0)

    fake.reply = flaky
    samples = load_samples(_cfg(questions, tmp_path / "out", fake.url, "data.answer_retries=2"))
    assert len(samples) == 8 and len(_chats(fake)) == 3 * 7
    assert sorted(row["answer"] for row in _rows(tmp_path / "out")) == ["ok"] * 7


def test_a_failure_stops_with_one_line_and_a_rerun_resumes(fake, questions, tmp_path):
    def refuse_the_pair(body):
        if "larger" in _text(body):
            return 400, {"error": {"message": "too many images in one prompt"}}, 0.0
        return 200, completion(f"answer to {_text(body)}"), 0.0

    fake.reply = refuse_the_pair
    cfg = _cfg(questions, tmp_path / "out", fake.url, "data.answer_concurrency=1")
    with pytest.raises(ConfigError) as raised:
        load_samples(cfg)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"record {TWO_IMAGES}: the teacher server at {fake.url} refused it (HTTP 400: ")
    assert "too many images in one prompt" in message and "the server's limits" in message
    saved = {row["id"] for row in _rows(cfg.output)}
    assert len(saved) == 6 and TWO_IMAGES not in saved  # every answer received before the refusal is kept

    fake.reply = lambda body: (200, completion(f"answer to {_text(body)}"), 0.0)
    fake.requests.clear()
    assert len(load_samples(cfg)) == 8
    assert [_text(body) for body in _chats(fake)] == ["first, then which digit is larger?"]  # only the rest
    assert sorted(row["id"] for row in _rows(cfg.output)) == sorted(saved | {TWO_IMAGES})


def test_a_timeout_names_the_setting(fake, questions, tmp_path):
    fake.reply = lambda body: (200, completion("late"), 3.0)
    cfg = _cfg(questions, tmp_path / "out", fake.url, "data.answer_timeout=0.5")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"did not answer after 0 retries .*data.answer_timeout=0.5") as raised:
        load_samples(cfg)
    assert "\n" not in str(raised.value) and raised.value.args[0].startswith("record digit-")
    assert time.perf_counter() - start < 3.0  # not held up by the requests still in flight


def test_a_malformed_reply_is_one_line(fake, questions, tmp_path):
    for payload in ({"choices": []}, {"object": "nothing"}, b"<html>not json</html>", completion(None)):
        fake.reply = lambda body, payload=payload: (200, payload, 0.0)
        with pytest.raises(ConfigError, match=r"^record digit-\d: the reply of .* is not a chat completion") as raised:
            load_samples(_cfg(questions, tmp_path / "out", fake.url, "data.answer_concurrency=1"))
        assert "\n" not in str(raised.value)
        assert not (tmp_path / "out" / "answers" / "answers.jsonl").read_text()


def test_the_model_must_be_served_and_the_server_reachable(fake, questions, tmp_path):
    fake.models = ["other-model", "third"]
    with pytest.raises(ConfigError, match=r"data.answer_model=teacher is not served at .* \(it serves: other-model"):
        load_samples(_cfg(questions, tmp_path / "out", fake.url))
    assert _chats(fake) == [] and not (tmp_path / "out" / "answers").exists()  # fixing the name is enough
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(ConfigError, match=rf"cannot reach the teacher server at data.answer_server={url} \("):
        load_samples(_cfg(questions, tmp_path / "out", url))


def test_a_refused_key_is_not_repeated(fake, questions, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    fake.reply = lambda body: (401, {"error": "bad key in " + json.dumps(body)[:10] + SECRET}, 0.0)
    with pytest.raises(ConfigError, match="HTTP 401.*check the key in the variable data.answer_key_env names") as e:
        load_samples(_cfg(questions, tmp_path / "out", fake.url, "data.answer_key_env=TEACHER_KEY"))
    assert SECRET not in str(e.value) and "***" in str(e.value)


def test_answers_from_another_model_or_server_are_refused(fake, questions, tmp_path):
    out = tmp_path / "out"
    load_samples(_cfg(questions, out, fake.url))
    before = (out / "answers" / "answers.jsonl").read_text()
    fake.models.append("bigger")
    with pytest.raises(FolderError, match="holds teacher answers made with other settings"):
        load_samples(_cfg(questions, out, fake.url, model="bigger"))
    with pytest.raises(FolderError, match="holds teacher answers made with other settings"):
        load_samples(_cfg(questions, out, fake.url.replace("127.0.0.1", "localhost")))
    requests = len(fake.requests)
    assert len(load_samples(_cfg(questions, out, fake.url + "/"))) == 8  # the same address: reused
    assert len(fake.requests) == requests
    with pytest.raises(FolderError, match="holds teacher answers made with other settings"):
        load_samples(load_config(CONFIG, [f"data.path={questions}", "data.answers=teacher"], teacher=TEACHER,
                                 output=str(out)))  # fmt: skip
    assert (out / "answers" / "answers.jsonl").read_text() == before


def test_cut_answers_are_left_out_kept_on_request_and_bounded(fake, questions, tmp_path, caplog):
    def cut_digit_questions(body):
        cut = "digit" in _text(body) and "larger" not in _text(body)
        return 200, completion("a long", "length" if cut else "stop"), 0.0

    fake.reply = cut_digit_questions
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as raised:
        load_samples(_cfg(questions, out, fake.url, "data.answer_concurrency=1"))
    message = str(raised.value)
    assert "\n" not in message and "stop at data.answer_max_tokens=8, more than data.max_cut_fraction=0.05" in message
    assert "raise data.answer_max_tokens" in message and "data.keep_cut_answers=true" in message
    # Stopped at the first cut answer (1 > 0.05 x 7), which is saved: nothing answered is lost.
    assert [row.get("cut") for row in _rows(out)][-1] is True and len(_chats(fake)) == len(_rows(out))

    cut = {row["id"] for row in _rows(out) if row.get("cut")}
    with caplog.at_level(logging.WARNING, logger="vlsi"):
        samples = load_samples(_cfg(questions, out, fake.url, "data.max_cut_fraction=1"))
    cut = {row["id"] for row in _rows(out) if row.get("cut")}
    assert len(_rows(out)) == 7 and 0 < len(cut) < 7
    assert {s.id for s in samples} == {s.id for s in read_dataset(questions, unanswered=True)[0]} - cut
    assert f"{len(cut)} of 7 answers were cut at data.answer_max_tokens=8" in caplog.text
    assert "they are left out (data.keep_cut_answers=true keeps them)" in caplog.text

    requests = len(_chats(fake))
    kept = load_samples(_cfg(questions, out, fake.url, "data.keep_cut_answers=true"))
    assert len(kept) == 8 and len(_chats(fake)) == requests  # read back, not asked again
    assert {s.id: s.messages[-1]["content"][0]["text"] for s in kept if s.id in cut} == dict.fromkeys(cut, "a long")


def test_settings_are_checked(questions, tmp_path):
    with pytest.raises(ConfigError, match="data.answers=server needs data.answer_server=URL"):
        load_config(CONFIG, [f"data.path={questions}", "data.answers=server", "data.answer_model=m"])
    with pytest.raises(ConfigError, match="data.answer_concurrency must be >= 1"):
        _cfg(questions, tmp_path, "http://127.0.0.1:1/v1", "data.answer_concurrency=0")
    with pytest.raises(ConfigError, match="data.answer_timeout > 0"):
        _cfg(questions, tmp_path, "http://127.0.0.1:1/v1", "data.answer_timeout=0")
    with pytest.raises(ConfigError, match="data.validate=lazy does not go with data.answers=server"):
        _cfg(questions, tmp_path, "http://127.0.0.1:1/v1", "data.validate=lazy")


# ---------------------------------------------------------------- `transformers serve` of the demo teacher


@pytest.fixture(scope="module")
def served_teacher(tmp_path_factory):
    """`transformers serve` of the demo teacher on 127.0.0.1 (CPU), started for this module and stopped after; the
    teacher is named on the command line, so /v1/models lists it (by its path) before the first request."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", TEACHER]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log_path.open("w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                pytest.fail(f"transformers serve stopped: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                    if TEACHER in response.read().decode():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start in 300 s: {log_path.read_text()[-2000:]}")
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the model process it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _local(questions, max_new_tokens) -> dict[str, str]:
    processor = load_processor(TEACHER)
    model = AutoModelForImageTextToText.from_pretrained(TEACHER).eval()
    samples = [s for s in read_dataset(questions, unanswered=True)[0] if s.messages[-1]["role"] == "user"]
    items = [Item(s.id, s.messages, list(s.images), {}) for s in samples]
    return dict(zip([s.id for s in samples], generate_answers(model, processor, items, max_new_tokens)))


def test_served_answers_equal_the_local_teachers(served_teacher, questions, tmp_path):
    cfg = _cfg(questions, tmp_path / "whole", served_teacher, "data.answer_concurrency=4", model=TEACHER)
    load_samples(cfg)
    rows = {row["id"]: row for row in _rows(cfg.output)}
    assert {i: row["answer"] for i, row in rows.items()} == _local(questions, 8)
    assert not any(row.get("cut") for row in rows.values())  # the demo teacher's answers are a token or two

    # One new token: every answer is cut, served and local alike, and the server says so.
    cfg = _cfg(questions, tmp_path / "cut", served_teacher, "data.answer_max_tokens=1", "data.max_cut_fraction=1",
               model=TEACHER)  # fmt: skip
    assert len(load_samples(cfg)) == 1  # only the answered record is left
    rows = {row["id"]: row for row in _rows(cfg.output)}
    assert {i: row["answer"] for i, row in rows.items()} == _local(questions, 1)
    assert all(row["cut"] for row in rows.values())


def test_sft_on_served_answers_end_to_end(served_teacher, questions, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["sft", "--model", STUDENT, "--data", str(questions), "--output", str(out), "--config", CONFIG]
    settings = ["sft.max_steps=2", "data.answers=server", f"data.answer_server={served_teacher}"]
    assert main([*argv, *settings, f"data.answer_model={TEACHER}", "data.answer_max_tokens=8"]) == 0
    assert {row["id"]: row["answer"] for row in _rows(out)} == _local(questions, 8)
    assert (out / "model" / "model.safetensors").is_file()
    assert load_config(out / "config.yaml").data.answer_server == served_teacher

    argv[argv.index(str(out))] = str(tmp_path / "other")
    assert main([*argv, *settings, "data.answer_model=not-served", "data.answer_max_tokens=8"]) == 2
    assert f"data.answer_model=not-served is not served at {served_teacher} (it serves: {TEACHER})" in (
        capsys.readouterr().err
    )


def test_train_on_served_answers_end_to_end(served_teacher, questions, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--teacher", TEACHER, "--student", STUDENT, "--data", str(questions), "--output", str(out)]
    steps = ["verbalize.max_steps=1", "interact.max_steps=1", "sft.max_steps=1", "data.answer_max_tokens=8"]
    served = ["data.answers=server", f"data.answer_server={served_teacher}", f"data.answer_model={TEACHER}"]
    assert main([*argv, "--config", CONFIG, *steps, *served]) == 0
    assert {row["id"]: row["answer"] for row in _rows(out)} == _local(questions, 8)
    assert (out / "student" / "model.safetensors").is_file()
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["verbalize/teacher", "verbalize/student", "interact", "sft"]
