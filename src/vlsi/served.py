"""A served teacher answers the prompts (`data.answers=server`): any OpenAI-compatible server (vLLM, SGLang,
`transformers serve`) holding a teacher too large for one device, through the official `openai` client.

    vllm serve Qwen/Qwen2-VL-72B-Instruct --tensor-parallel-size 8 --port 8000
    vlsi sft --model S --data questions.jsonl --output OUT data.answers=server \\
        data.answer_server=http://127.0.0.1:8000/v1 data.answer_model=Qwen/Qwen2-VL-72B-Instruct

Each prompt is one `/v1/chat/completions` request: the conversation up to its trailing user turn, every image as a
base64 PNG `image_url` part where the record places it, greedy (temperature 0), at most `data.answer_max_tokens`
new tokens. `data.answer_concurrency` requests are in flight at once (the server batches them); the answers come
back in the order they finish, and `vlsi.answers` writes each to OUT/answers/answers.jsonl as it arrives. The
client retries timeouts, 408, 409, 429 and 5xx `data.answer_retries` times with exponential backoff; what still
fails stops the run with one line naming the record or the setting and the fix. docs/SERVING.md.

The API key is read from the environment variable named by `data.answer_key_env` and sent only in the
Authorization header: it is never logged, written or shown in an error.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import openai

from .config import ConfigError, DataConfig
from .data import Sample
from .eval.generate import load_image

log = logging.getLogger("vlsi")

# Sent where data.answer_key_env names no key: the client needs one, and servers started without a key ignore it.
NO_KEY = "EMPTY"
# Requests submitted ahead of the ones in flight, per request in flight: enough to keep the server busy without
# holding millions of futures.
QUEUED_PER_WORKER = 4


class ServerError(ConfigError):
    """The served teacher cannot answer: the message names the server, the record or setting, and the fix."""


@dataclass(frozen=True)
class Answer:
    """The served teacher's answer to one prompt; `cut`: it stopped at data.answer_max_tokens (finish_reason
    "length"), so it is not a whole answer."""

    id: str
    text: str
    cut: bool


def identity(data: DataConfig) -> str:
    """What the answers are made with, for OUT/answers/index.json: the served model and the server's address."""
    return f"{data.answer_model} served at {data.answer_server.rstrip('/')}"


def connect(data: DataConfig) -> openai.OpenAI:
    """A client of data.answer_server, checked to serve data.answer_model: stops before any prompt is sent (and
    before OUT/answers is written) when the server cannot be reached or does not serve the model."""
    key = os.environ.get(data.answer_key_env) if data.answer_key_env else None
    if data.answer_key_env and not key:
        log.warning("data.answer_key_env=%s: that variable is not set; no API key is sent", data.answer_key_env)
    client = openai.OpenAI(
        base_url=data.answer_server.rstrip("/"),
        api_key=key or NO_KEY,
        timeout=data.answer_timeout,
        max_retries=data.answer_retries,
    )
    _check_served(client, data)
    return client


def _check_served(client: openai.OpenAI, data: DataConfig) -> None:
    where = data.answer_server.rstrip("/")
    try:
        served = [model.id for model in client.models.list()]
    except openai.APIConnectionError as e:
        raise ServerError(
            f"cannot reach the teacher server at data.answer_server={where} ({_reason(e, client)}); start the server "
            "(docs/SERVING.md) or fix the address"
        ) from None
    except openai.APIStatusError as e:
        raise ServerError(
            f"the teacher server at data.answer_server={where} refused to list its models ({_status(e, client)}); "
            f"{_fix(e, data)}"
        ) from None
    if data.answer_model not in served:
        raise ServerError(
            f"data.answer_model={data.answer_model} is not served at {where} (it serves: "
            f"{', '.join(served) or 'nothing'}); set data.answer_model to one of those, or serve that model there"
        )


def answers(client: openai.OpenAI, data: DataConfig, prompts: list[Sample]) -> Iterator[Answer]:
    """The served teacher's answers to `prompts` (through `client`, from `connect`), in the order they arrive,
    `data.answer_concurrency` requests in flight. The first request that fails raises ServerError, after the answers
    already received are yielded; the requests not yet sent are dropped."""
    pool = ThreadPoolExecutor(max_workers=data.answer_concurrency, thread_name_prefix="vlsi-answer")
    queued = data.answer_concurrency * QUEUED_PER_WORKER
    running: dict[Future, Sample] = {}
    todo = iter(prompts)
    try:
        while True:
            for sample in todo:
                running[pool.submit(ask, client, data, sample)] = sample
                if len(running) >= queued:
                    break
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            failed = None
            for future in done:
                del running[future]
                if future.exception() is None:
                    yield future.result()
                else:
                    failed = failed or future.exception()
            if failed is not None:
                raise failed
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()  # requests still in flight fail at once instead of holding the process up


def ask(client: openai.OpenAI, data: DataConfig, sample: Sample) -> Answer:
    """One prompt's answer; ServerError (naming the record) when the request fails for good."""
    where = data.answer_server.rstrip("/")
    try:
        reply = client.chat.completions.create(
            model=data.answer_model,
            messages=chat_messages(sample),
            temperature=0.0,
            max_tokens=data.answer_max_tokens,
        )
    except openai.APIConnectionError as e:  # the timeouts too, after the retries
        raise ServerError(
            f"record {sample.id}: the teacher server at {where} did not answer after {data.answer_retries} retries "
            f"({_reason(e, client)}); check that it is up, or raise data.answer_timeout={data.answer_timeout:g} "
            "(seconds) or data.answer_retries, and rerun to resume"
        ) from None
    except openai.APIStatusError as e:
        if e.status_code >= 500 or e.status_code in (408, 409, 429):
            raise ServerError(
                f"record {sample.id}: the teacher server at {where} failed after {data.answer_retries} retries "
                f"({_status(e, client)}); rerun to resume once it is healthy, or raise data.answer_retries"
            ) from None
        raise ServerError(
            f"record {sample.id}: the teacher server at {where} refused it ({_status(e, client)}); {_fix(e, data)}"
        ) from None
    except (ValueError, openai.APIResponseValidationError) as e:  # a body that is not JSON
        raise _malformed(sample, where, _redact(f"{type(e).__name__}: {e}", client)) from None
    try:
        (choice,) = reply.choices
        text, finish = choice.message.content, choice.finish_reason
    except (AttributeError, TypeError, ValueError):
        text, finish = None, None
    if not isinstance(text, str) or finish not in ("stop", "length"):
        raise _malformed(sample, where, _redact(str(reply), client))
    return Answer(sample.id, text.strip(), finish == "length")


def _malformed(sample: Sample, where: str, got: str) -> ServerError:
    return ServerError(
        f"record {sample.id}: the reply of {where} is not a chat completion with one choice holding message.content "
        f"and finish_reason stop or length (got {got[:200]!r}); point data.answer_server at an OpenAI-compatible /v1 "
        "endpoint"
    )


def chat_messages(sample: Sample) -> list[dict]:
    """The sample's conversation as OpenAI chat messages: each `{"type": "image"}` item becomes the next image of
    the record as a base64 PNG `image_url` part (the pixels the local teacher sees: decoded, RGB); the turns that
    hold no image carry their text as a string, as every server reads it."""
    images = iter(sample.images)
    messages = []
    for message in sample.messages:
        content = message["content"]
        if any(item["type"] == "image" for item in content):
            parts = [_image_part(next(images)) if item["type"] == "image" else item for item in content]
            messages.append({"role": message["role"], "content": parts})
        else:
            messages.append({"role": message["role"], "content": "".join(item["text"] for item in content)})
    return messages


def _image_part(path) -> dict:
    buffer = io.BytesIO()
    load_image(path).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}


def _fix(error: openai.APIStatusError, data: DataConfig) -> str:
    if error.status_code in (401, 403):
        return f"check the key in the variable data.answer_key_env names (now {data.answer_key_env or 'none'})"
    if error.status_code == 404:
        return "check data.answer_server (the base URL ends with /v1) and data.answer_model"
    return (
        "check the record, data.answer_max_tokens and the server's limits (its maximum model length, the images "
        "per prompt it accepts), or leave the record out"
    )


def _status(error: openai.APIStatusError, client: openai.OpenAI) -> str:
    body = error.body if error.body is not None else error.response.text
    return _redact(f"HTTP {error.status_code}: {str(body)[:300]}", client)


def _reason(error: openai.APIConnectionError, client: openai.OpenAI) -> str:
    cause = error.__cause__ or error
    return _redact(f"{type(cause).__name__}: {cause}", client)


def _redact(text: str, client: openai.OpenAI) -> str:
    """Servers may echo the Authorization header in an error: the key never reaches a message."""
    key = client.api_key
    return text.replace(key, "***") if key and key != NO_KEY else text
