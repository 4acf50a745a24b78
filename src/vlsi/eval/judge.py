"""LLM judge: a client for any OpenAI-compatible chat endpoint and the grading prompts.

A judge is any callable `judge(prompt, *, temperature=0.0, system=None) -> str`; scorers take one as an
argument, so tests pass a fake and the CLI passes the `Judge` that `make_judge(url, model, key_env)` builds, on the
official `openai` client (as the served teacher of `vlsi.served`). The API key is sent only in the Authorization
header: it is kept out of repr(), error messages and logs.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import openai

from .io import ScoreError

JudgeFn = Callable[..., str]
T = TypeVar("T")

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# Sent when no key is given: the client needs one, and servers started without a key ignore it.
NO_KEY = "EMPTY"
_SUFFIX = "/chat/completions"


class JudgeError(ScoreError):
    """The judge endpoint could not be used (bad address, refused key, or down after every retry)."""


@dataclass(frozen=True)
class Judge:
    """A chat client of any OpenAI-compatible endpoint, through the `openai` client: timeouts, connection errors,
    408, 409, 429 and 5xx are retried `retries` times with exponential backoff; other statuses fail at once.

    url: base URL ("http://127.0.0.1:8000/v1") or the full ".../chat/completions" address.
    """

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    retries: int = 4
    timeout_s: float = 120.0
    max_tokens: int = 1024
    client: openai.OpenAI = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        base = self.url.rstrip("/").removesuffix(_SUFFIX)
        client = openai.OpenAI(
            base_url=base, api_key=self.api_key or NO_KEY, timeout=self.timeout_s, max_retries=self.retries
        )
        object.__setattr__(self, "client", client)  # one client (its connection pool) for every thread

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/").removesuffix(_SUFFIX) + _SUFFIX

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def __call__(self, prompt: str, *, temperature: float = 0.0, system: str | None = None) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=temperature, max_tokens=self.max_tokens
            )
        except openai.APIStatusError as e:
            body = e.body if e.body is not None else e.response.text
            problem = f"HTTP {e.status_code}: {self._redact(str(body)[:300])}"
            if e.status_code < 500 and e.status_code not in (408, 409, 429):
                raise JudgeError(
                    f"judge {self.endpoint} answered {problem}; check --judge-url, --judge-model and the key"
                ) from None
            raise self._gave_up(problem) from None
        except openai.APIConnectionError as e:  # the timeouts too
            raise self._gave_up(self._redact(f"{type(e.__cause__ or e).__name__}: {e.__cause__ or e}")) from None
        except (ValueError, openai.APIResponseValidationError):  # a body that is not JSON
            raise self._not_a_completion() from None
        try:
            return reply.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise self._not_a_completion() from None

    def _gave_up(self, problem: str) -> JudgeError:
        return JudgeError(
            f"judge {self.endpoint} failed {self.retries + 1} times (last: {problem}); is the server up at --judge-url?"
        )

    def _not_a_completion(self) -> JudgeError:
        return JudgeError(
            f"judge {self.endpoint} did not return an OpenAI chat completion (choices[0].message.content); "
            "point --judge-url at an OpenAI-compatible /v1 endpoint"
        )


def make_judge(url: str | None, model: str | None, key_env: str | None = None) -> Judge | None:
    """The judge at `url` asked for `model` (`vlsi score / eval --judge-url --judge-model`), or None without both;
    the API key is read from the environment variable `key_env` (default $OPENAI_API_KEY; unset: a dummy key)."""
    if url is None and model is None:
        return None
    if url is None or model is None:
        raise ScoreError("--judge-url and --judge-model go together; pass both")
    api_key = os.environ.get(key_env or DEFAULT_KEY_ENV) or None
    if key_env and api_key is None:
        raise ScoreError(f"--judge-key-env names ${key_env}, which is not set; export the key in it")
    return Judge(url=url, model=model, api_key=api_key)


def grade_all(
    judge: JudgeFn,
    prompts: Sequence[str],
    parse: Callable[[str], T | None],
    temperatures: Sequence[float],
    system: str | None = None,
    workers: int = 8,
) -> list[T | None]:
    """Ask the judge every prompt (in parallel, results in order); re-ask at the next temperature while the
    reply does not parse. None where no attempt parsed."""

    def grade(prompt: str) -> T | None:
        for temperature in temperatures:
            value = parse(judge(prompt, temperature=temperature, system=system))
            if value is not None:
                return value
        return None

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(grade, prompts))
    finally:
        # On a JudgeError, drop the prompts not yet sent instead of failing each of them in turn.
        pool.shutdown(cancel_futures=True)


class SharedReplies:
    """One judge's replies shared by several scoring procedures (the VLMEvalKit and the lenient rules).

    Each `session()` is a judge callable; the n-th time a session sends a (prompt, temperature, system), it gets the
    reply to the n-th such request, which the judge is asked only once over all sessions. Both numbers thus come
    from the same replies, and the judge is asked only what the procedures together need.
    """

    def __init__(self, judge: JudgeFn):
        self._judge = judge
        self._replies: dict[tuple, Future] = {}
        self._lock = threading.Lock()

    def session(self) -> JudgeFn:
        sent: Counter = Counter()

        def ask(prompt: str, *, temperature: float = 0.0, system: str | None = None) -> str:
            request = (prompt, temperature, system)
            with self._lock:
                key = (*request, sent[request])
                sent[request] += 1
                reply = self._replies.get(key)
                asking = reply is None
                if asking:
                    reply = self._replies[key] = Future()
            if asking:
                try:
                    reply.set_result(self._judge(prompt, temperature=temperature, system=system))
                except BaseException as e:
                    reply.set_exception(e)
            return reply.result()

        return ask


# MM-Vet's few-shot grading prompt as VLMEvalKit sends it (vlmeval/dataset/utils/mmvet.py): the official MM-Vet
# prompt with its long lines wrapped; used under both rules, so that one set of replies serves both numbers.
MMVET_PROMPT = (
    "\nCompare the ground truth and prediction from AI models, to give a correctness score for the prediction.\n"
    "<AND> in the ground truth means it is totally right\n"
    "only when all elements in the ground truth are present in the prediction,\n"
    "and <OR> means it is totally right when any one element in the ground truth is present in the prediction.\n"
    "The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally "
    "right).\n"
    "Just complete the last space of the correctness score.\n"
    "\n"
    "Question | Ground truth | Prediction | Correctness\n"
    "--- | --- | --- | ---\n"
    "What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the countries\n"
    "Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,\n"
    "while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues\n"
    "because the names of these countries do not accurately represent their landscapes. |\n"
    "The meme talks about Iceland and Greenland. It's pointing out that despite their names,\n"
    "Iceland is not very icy and Greenland isn't very green. | 0.4\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the countries\n"
    "Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,\n"
    "while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues\n"
    "because the names of these countries do not accurately represent their landscapes. |\n"
    "The meme is using humor to point out the misleading nature of Iceland's and Greenland's names.\n"
    "Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow.\n"
    "The text 'This is why I have trust issues' is a playful way to suggest\n"
    "that these contradictions can lead to distrust or confusion.\n"
    "The humor in this meme is derived from the unexpected contrast between the names of the countries\n"
    "and their actual physical characteristics. | 1.0\n"
)
# VLMEvalKit re-asks an unparsable MM-Vet grade up to 5 times at temperature 0, 0.5, ..., 2.0.
MMVET_TEMPERATURES = (0.0, 0.5, 1.0, 1.5, 2.0)


def mmvet_prompt(question: str, answer: str, prediction: str) -> str:
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return f"{MMVET_PROMPT}\n{question} | {truth} | {prediction} | "


def parse_mmvet_grade(reply: str) -> float | None:
    """The grade in [0, 1] that starts the reply ("0.6", "0.6 because ..."), or None (lenient rule)."""
    words = reply.split()
    try:
        grade = float(words[0].rstrip(".,")) if words else None
    except ValueError:
        return None
    return grade if grade is not None and 0.0 <= grade <= 1.0 else None


def parse_mmvet_grade_vlmevalkit(reply: str) -> float | None:
    """VLMEvalKit's rule: the whole stripped reply is a number not below 0 or above 1 ("nan" passes), or None."""
    try:
        grade = float(reply.strip())
    except ValueError:
        return None
    return None if grade < 0 or grade > 1 else grade


# LLaVA-Bench's reviewer (as in VLMEvalKit's LLaVABench and lmms-eval's LLaVA-Wilder): the reference answer is
# Assistant 1, the model Assistant 2. The judge here reads text only, so it is told it does not see the image.
WILDER_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
WILDER_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image, which is not shown to you. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance. "
    "Assume assistant 1 always receive a score of 10 and is the correct answer.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)
# VLMEvalKit's LLaVABench judges at temperature 0.2; an unparsable review is asked again, up to 3 times.
WILDER_TEMPERATURES = (0.2, 0.2, 0.2)


def wilder_prompt(question: str, reference: str, prediction: str) -> str:
    return (
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{prediction}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{WILDER_RULE}\n\n"
    )


def parse_wilder_scores(reply: str) -> tuple[float, float] | None:
    """(reference score, model score) from the review's first line ("8 7", "8, 7", "8  7"), or None (lenient)."""
    lines = reply.strip().splitlines()
    values = lines[0].replace(",", " ").split() if lines else []
    if len(values) != 2:
        return None
    try:
        return float(values[0]), float(values[1])
    except ValueError:
        return None


def parse_wilder_scores_vlmevalkit(reply: str) -> tuple[float, float] | None:
    """VLMEvalKit's LLaVABench rule: the stripped review's first line, commas read as spaces, cut at every single
    space, must give exactly two numbers ("8 7", "8,7"; not "8, 7" or "8  7"), or None."""
    values = reply.strip().split("\n")[0].replace(",", " ").split(" ")
    try:
        return (float(values[0]), float(values[1])) if len(values) == 2 else None
    except ValueError:
        return None


# MathVista's answer-extraction prompt as VLMEvalKit sends it (vlmeval/dataset/utils/mathvista.py, from MathVista's
# own evaluation): five worked examples, then the row's question and the response, spelled "respone" and with no
# line break before "Extracted answer:", as there. Used under both rules.
MATHVISTA_EXAMPLES = (
    "\nHint: Please answer the question requiring an integer answer and provide the final value,\n"
    "e.g., 1, 2, 3, at the end.\n\n"
    "Question: Which number is missing?\n\n"
    "Model response: The number missing in the sequence is 14.\n\n"
    "Extracted answer: 14\n",
    "\nHint: Please answer the question requiring a floating-point number with one decimal place and provide the "
    "final value,\ne.g., 1.2, 1.3, 1.4, at the end.\n\n"
    "Question: What is the fraction of females facing the camera?\n\n"
    "Model response: The fraction of females facing the camera is 0.6,\n"
    "which means that six out of ten females in the group are facing the camera.\n\n"
    "Extracted answer: 0.6\n",
    "\nHint: Please answer the question requiring a floating-point number with two decimal places and provide the "
    "final value,\ne.g., 1.23, 1.34, 1.45, at the end.\n\n"
    "Question: How much money does Luca need to buy a sour apple candy and a butter-scotch candy? (Unit: $)\n\n"
    "Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.\n\n"
    "Extracted answer: 1.45\n",
    "\nHint: Please answer the question requiring a Python list as an answer and provide the final list,\n"
    "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.\n\n"
    "Question: Between which two years does the line graph saw its maximum peak?\n\n"
    "Model response: The line graph saw its maximum peak between 2007 and 2008.\n\n"
    "Extracted answer: [2007, 2008]\n",
    "\nHint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n\n"
    "Question: What fraction of the shape is blue?\n\n"
    "Choices: (A) 3/11 (B) 8/11 (C) 6/11 (D) 3/5\n\n"
    "Model response: The correct answer is (B) 8/11.\n\n"
    "Extracted answer: B\n",
)
MATHVISTA_TASK = (
    "\nPlease read the following example.\n"
    "Then extract the answer from the model response and type it at the end of the prompt.\n\n"
)


def mathvista_prompt(question: str, prediction: str) -> str:
    examples = "".join(example + "\n" for example in MATHVISTA_EXAMPLES)
    return f"{MATHVISTA_TASK}{examples}{question}\nModel respone: {prediction}Extracted answer:"


def parse_extracted(reply: str) -> str | None:
    """The judge's extracted answer, or None when it returned nothing."""
    return reply.strip() or None
