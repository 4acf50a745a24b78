"""On-policy distillation (interact.on_policy, docs/METHOD.md#on-policy-distillation): batches rebuilt around the
student's samples, the step's loss on those tokens against a plain reference, λ = 0 as today bit for bit, empty and
capped samples, the refusals, and exact resume."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from commands import train_argv
from safetensors.torch import load_file
from test_stages import _cfg, _interaction, _snapshot
from test_stages import toy as toy  # noqa: F401 -- the module's tiny pair and digits

from vlsi.config import ConfigError
from vlsi.data import IGNORE_INDEX, split_batch
from vlsi.stages.loop import MetricsLog, train
from vlsi.stages.onpolicy import cut, prompts, sample, with_responses
from vlsi.toy import write_toy

ACCELERATE = Path(__file__).parent.parent / "configs" / "accelerate"

ON = ["interact.on_policy=1", "interact.sample.max_new_tokens=5"]


def test_rows_are_rebuilt_around_the_responses():
    """A hand-made batch of two rows (prompt, answer, right padding): the prompts left-padded for `generate`, each
    sample cut at its first end token (2) or at the cap, and the rows rebuilt with labels on the responses only; a
    sample that ends at once leaves its row as it was."""
    ids = torch.tensor([[5, 6, 7, 8, 2, 0], [5, 9, 8, 2, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 2, -100], [-100, -100, 8, 2, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    types = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    encoded = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, "labels": labels}
    encoded["pixel_values"] = torch.ones(3, 4)
    inputs = prompts(encoded, pad_id=0)
    assert inputs["input_ids"].tolist() == [[5, 6], [5, 9]] and inputs["attention_mask"].tolist() == [[1, 1]] * 2
    assert inputs["mm_token_type_ids"].tolist() == [[1, 1], [1, 0]]
    assert inputs["pixel_values"] is encoded["pixel_values"]
    assert "labels" not in inputs

    responses = cut(torch.tensor([[3, 4, 2, 0], [4, 4, 4, 4], [2, 0, 0, 0]]), ends={2})
    assert [None if t is None else t.tolist() for t in responses.tokens] == [[3, 4, 2], [4, 4, 4, 4], None]
    assert responses.lengths == [2, 4, 0] and responses.capped == [False, True, False]

    rebuilt = with_responses(encoded, [torch.tensor([3, 4, 4, 2]), None], pad_id=0)
    assert rebuilt["input_ids"].tolist() == [[5, 6, 3, 4, 4, 2], [5, 9, 8, 2, 0, 0]]
    assert rebuilt["labels"].tolist() == [[-100, -100, 3, 4, 4, 2], [-100, -100, 8, 2, -100, -100]]
    assert rebuilt["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert rebuilt["mm_token_type_ids"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert rebuilt["pixel_values"] is encoded["pixel_values"]


def _sampled(step, batch, state):
    """The responses the step sampled for `batch`, drawn again from the on-policy generator's `state`."""
    on_policy = step.on_policy
    on_policy.generator.set_state(state)
    seed = on_policy.draw()
    inputs = prompts(batch["student"], on_policy.pad_ids["student"])
    pad = on_policy.pad_ids["student"]
    new = sample(step.student, inputs, on_policy.options, on_policy.ends, pad, seed, on_policy.suppressed)
    return cut(new, on_policy.ends)


def _row(encoded, r, image_offsets):
    """Row r of a collated Qwen2-VL batch, unpadded, as the model's inputs of a batch of one."""
    n = int(encoded["attention_mask"][r].sum())
    row = {k: encoded[k][r : r + 1, :n] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    images = {"pixel_values": encoded["pixel_values"][image_offsets[r] : image_offsets[r + 1]]}
    return row | images | {"image_grid_thw": encoded["image_grid_thw"][r : r + 1]}


def test_a_sample_never_draws_an_image_placeholder_or_another_special_token(toy, tmp_path):
    """A student whose head prefers the image token would put a placeholder without features into its response (the
    forward then stops: "Image features and image tokens do not match", as `vlsi demo on_policy=0.5` did): every
    special token but the end tokens is suppressed when it samples."""
    run = _interaction(toy, tmp_path, *ON)
    step, on_policy = run.step, run.step.on_policy
    image = step.student.config.image_token_id
    assert image in on_policy.suppressed and not set(on_policy.suppressed) & on_policy.ends
    with torch.no_grad():  # the image token's row far above every other: plain sampling draws it every time
        step.student.get_output_embeddings().weight[image] *= 1e4
    inputs = prompts(next(iter(run.loader))["student"], on_policy.pad_ids["student"])
    pad = on_policy.pad_ids["student"]
    drawn = sample(step.student, inputs, on_policy.options, on_policy.ends, pad, 0)
    assert (drawn == image).any(), "the premise: unsuppressed, the student samples its image token"
    kept = sample(step.student, inputs, on_policy.options, on_policy.ends, pad, 0, on_policy.suppressed)
    assert not torch.isin(kept, torch.tensor(on_policy.suppressed)).any()


def test_on_policy_loss_on_the_sampled_tokens_is_the_plain_reverse_kl(toy, tmp_path):
    """Final-layer KD on an on-policy batch: the step's loss equals reverse KL(student || teacher) written out with
    plain torch ops, per response token of each prompt + sampled sequence run alone (no padding), averaged."""
    run = _interaction(toy, tmp_path, *ON, "interact.intermediate_loss=none")
    step, teacher = run.step, run.step.teacher
    batch = next(iter(run.loader))
    state = step.on_policy.generator.get_state()
    loss, logs = step(batch)
    responses = _sampled(step, batch, state)
    assert logs["loss/on_policy"] == loss.item() and "loss/off_policy" not in logs
    assert logs["sample/length"] == sum(responses.lengths) / 4
    assert logs["sample/capped"] == sum(responses.capped) / 4

    s, t = batch["student"], batch["teacher"]
    patches = s["image_grid_thw"].prod(-1).cumsum(0).tolist()
    offsets = [0, *patches]
    per_token = []
    for r, response in enumerate(responses.tokens):
        labelled = (s["labels"][r] != IGNORE_INDEX).nonzero().flatten()
        start = int(labelled[0])  # one answer per toy record
        response = s["input_ids"][r, start : int(labelled[-1]) + 1] if response is None else response
        sequence = torch.cat([s["input_ids"][r, :start], response])[None]  # [1, T]
        inputs = _row(s, r, offsets) | {"input_ids": sequence, "attention_mask": torch.ones_like(sequence)}
        inputs["mm_token_type_ids"] = torch.cat([s["mm_token_type_ids"][r, :start], torch.zeros_like(response)])[None]
        with torch.no_grad():
            t_logits = teacher.model(**(inputs | {"pixel_values": _row(t, r, offsets)["pixel_values"]})).logits
        s_logits = step.student(**inputs).logits
        positions = slice(start - 1, sequence.shape[1] - 1)  # each predicts the next, sampled token
        ls = torch.log_softmax(s_logits[0, positions, : step.vocab], -1)
        lt = torch.log_softmax(t_logits[0, positions, : step.vocab], -1)
        per_token.append((ls.exp() * (ls - lt)).sum(-1))
    torch.testing.assert_close(loss, torch.cat(per_token).mean(), rtol=1e-5, atol=1e-7)


def test_layer_terms_are_taken_on_the_sampled_tokens(toy, tmp_path):
    """VLsI on an on-policy batch is VLsI with interact.on_policy_divergence on the rebuilt batch: the same matches,
    layer terms and loss as an off-policy step given the student's responses as fixed ones."""
    run = _interaction(toy, tmp_path / "on", *ON)
    step = run.step
    batch = next(iter(run.loader))
    sampler, matcher = step.on_policy.generator.get_state(), step.generator.get_state()
    loss, logs = step(batch)
    responses = _sampled(step, batch, sampler)
    rebuilt = {name: with_responses(enc, responses.tokens, step.on_policy.pad_ids[name]) for name, enc in batch.items()}
    off = _interaction(toy, tmp_path / "off", "interact.divergence=reverse").step
    off.generator.set_state(matcher)
    off_loss, off_logs = off(rebuilt)
    assert logs["match"] == off_logs["match"]
    assert {k: v for k, v in logs.items() if k.startswith("kl/")} == {
        k: v for k, v in off_logs.items() if k.startswith("kl/")
    }
    torch.testing.assert_close(loss, off_loss, rtol=0, atol=0)


def test_a_sample_that_ends_at_once_keeps_its_fixed_response(toy, tmp_path):
    """Every token ends a response here: every sample is empty, so every row keeps its fixed response, and the step
    is the off-policy step with the on-policy divergence on the batch as it came."""
    run = _interaction(toy, tmp_path / "on", *ON)
    run.step.on_policy.ends = set(range(run.step.vocab))
    batch = next(iter(run.loader))
    matcher = run.step.generator.get_state()
    loss, logs = run.step(batch)
    assert logs["sample/empty"] == 1.0 and logs["sample/length"] == 0.0 and logs["sample/capped"] == 0.0
    off = _interaction(toy, tmp_path / "off", "interact.divergence=reverse").step
    off.generator.set_state(matcher)
    torch.testing.assert_close(loss, off(batch)[0], rtol=0, atol=0)


def test_a_capped_sample_is_kept_and_counted(toy, tmp_path):
    """One new token at most: a row either ends at once (its fixed response kept) or is capped, its one sampled token
    the only labelled one."""
    run = _interaction(toy, tmp_path, *ON, "interact.sample.max_new_tokens=1", "interact.intermediate_loss=none")
    batch = next(iter(run.loader))
    responses = _sampled(run.step, batch, run.step.on_policy.generator.get_state())
    loss, logs = run.step(batch)
    assert torch.isfinite(loss)
    assert logs["sample/capped"] + logs["sample/empty"] == 1.0 and logs["sample/capped"] == sum(responses.capped) / 4
    rebuilt = with_responses(batch["student"], responses.tokens, run.step.on_policy.pad_ids["student"])
    fixed = (batch["student"]["labels"] != IGNORE_INDEX).sum(1)
    for r, capped in enumerate(responses.capped):
        assert (rebuilt["labels"][r] != IGNORE_INDEX).sum() == (1 if capped else fixed[r])


def test_sampling_leaves_the_global_rng_and_the_mode_alone(toy, tmp_path):
    run = _interaction(toy, tmp_path, *ON)
    run.step.train()
    batch = next(iter(run.loader))  # a loader's iterator draws its base seed from the global RNG
    state = torch.get_rng_state()
    run.step(batch)
    assert torch.equal(state, torch.get_rng_state()) and run.step.student.training


def _trained(toy, out, *overrides):
    """Two optimizer steps of two micro-batches: the student's weights and the metrics lines."""
    run = _interaction(toy, out, "interact.max_steps=2", "interact.grad_accum=2", "interact.lr=1e-2", *overrides)
    train(run.accelerator, run.step, run.loader, run.step.cfg, "interact", MetricsLog(out / "m.jsonl"))
    lines = [json.loads(line) for line in (out / "m.jsonl").read_text().splitlines()]
    return run, _snapshot(run.step), lines


def test_lambda_zero_is_todays_interaction_bit_for_bit(toy, tmp_path):
    """λ = 0 with every on-policy setting moved: the same weights, metrics and checkpointed generators as a run
    without them."""
    today, weights, lines = _trained(toy, tmp_path / "today")
    moved = ["interact.on_policy=0", "interact.on_policy_divergence=jsd", "interact.sample.temperature=0.5"]
    run, zero_weights, zero_lines = _trained(toy, tmp_path / "zero", *moved, "interact.sample.max_new_tokens=3")
    assert run.step.on_policy is None and run.generators.keys() == today.generators.keys() == {"match"}
    assert zero_lines == lines and not any(k.startswith(("sample/", "loss/")) for k in lines[0])
    assert weights.keys() == zero_weights.keys() and all(torch.equal(weights[k], zero_weights[k]) for k in weights)


def test_half_on_policy_logs_both_kinds_of_batch(toy, tmp_path):
    """λ = 0.5 over 2 steps x 2 micro-batches (the draws of seed 0): on- and off-policy losses apart, the sample
    metrics averaged over the on-policy micro-batches; the student trains."""
    run, weights, lines = _trained(toy, tmp_path, "interact.on_policy=0.5", "interact.sample.max_new_tokens=4")
    assert run.generators.keys() == {"match", "on_policy"}
    assert any("loss/on_policy" in line for line in lines) and any("loss/off_policy" in line for line in lines)
    for line in lines:
        if "loss/on_policy" in line:
            assert 0 < line["sample/length"] <= 4 and 0 <= line["sample/capped"] <= 1
        if "loss/off_policy" not in line:
            assert line["loss"] == pytest.approx(line["loss/on_policy"])


@pytest.mark.parametrize(
    "settings, message",
    [
        (["interact.on_policy=1.5"], "interact.on_policy is a share of micro-batches, between 0 and 1"),
        (["interact.jsd_beta=1"], "interact.jsd_beta must lie strictly between 0 and 1"),
        (["interact.sample.top_p=0"], "0 < interact.sample.top_p <= 1"),
        (["interact.on_policy=0.5", "teacher_cache=C"], "interact.on_policy=0.5 needs the live teacher"),
    ],
)
def test_bad_on_policy_settings_are_refused_in_one_line(toy, settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        _cfg(toy, *settings)
    assert "\n" not in str(error.value)


def test_split_batch_reads_a_rebuilt_batch(toy, tmp_path):
    """The loss positions of a rebuilt row are those predicting its sampled tokens, and only those."""
    run = _interaction(toy, tmp_path, *ON)
    batch = next(iter(run.loader))
    responses = _sampled(run.step, batch, run.step.on_policy.generator.get_state())
    rebuilt = with_responses(batch["student"], responses.tokens, 0)
    _, mask, targets = split_batch(rebuilt)
    labels = batch["student"]["labels"]
    want = torch.cat([labels[r][labels[r] != IGNORE_INDEX] if t is None else t for r, t in enumerate(responses.tokens)])
    assert torch.equal(targets, want) and mask.sum() == len(want)


# ---------------------------------------------------------------- `vlsi train` runs: resume, launches

SHORT = ["verbalize.max_steps=1", "sft.max_steps=1", "verbalize.batch_size=2", "interact.batch_size=2"]
SHORT += ["sft.batch_size=2", "interact.on_policy=0.5", "interact.sample.max_new_tokens=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return tuple(str(p) for p in write_toy(tmp_path_factory.mktemp("toy"), n=10))


def _train(written, out, *settings) -> list[str]:
    """`vlsi train` on the toy, short stages, λ = 0.5, without the program name."""
    return train_argv(*written, out, *SHORT, *settings)


def test_killed_on_policy_run_resumes_exactly(written, tmp_path):
    """λ = 0.5: SIGKILLed after the interaction stage's step-2 checkpoint, the same command resumes to the student
    and the metrics of an uninterrupted run (the on-policy draws and the sampling seeds live in the checkpoint)."""
    settings = ["interact.max_steps=4", "checkpoint.every=1"]
    command = [sys.executable, "-m", "vlsi", *_train(written, tmp_path / "straight", *settings)]
    straight = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "resumed"
    command = [sys.executable, "-m", "vlsi", *_train(written, out, *settings)]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved, deadline = out / "checkpoints" / "interact" / "step-00000002", time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline and not saved.is_dir():
        time.sleep(0.002)
    process.kill()
    process.wait()
    assert saved.is_dir() and not (out / "stages" / "interact").exists(), "killed inside the interaction stage"
    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]

    def interaction(folder):
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [line for line in lines if line["stage"] == "interact"]

    want, got = interaction(tmp_path / "straight"), interaction(out)
    assert [line["step"] for line in got] == [1, 2, 3, 4] and got == want
    assert any("loss/on_policy" in line for line in want) and any("loss/off_policy" in line for line in want)
    a, b = (load_file(folder / "student" / "model.safetensors") for folder in (tmp_path / "straight", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _launch(config: str, script: list[str], *options: str) -> list[str]:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config), *options]
    return [*launch, "--num_processes", "2", "--main_process_port", str(port), *script]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_two_ddp_processes_sample_their_own_prompts(written, tmp_path):
    """Two DDP processes (gloo): each samples its own micro-batch's responses, both take the same kind of micro-batch
    at each micro-step, and the metrics hold both kinds."""
    env = ENV | {"ACCELERATE_USE_CPU": "true"}
    command = _launch("ddp.yaml", ["-m", "vlsi"]) + _train(written, tmp_path, "interact.max_steps=3")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    interaction = [line for line in lines if line["stage"] == "interact"]
    assert [line["step"] for line in interaction] == [1, 2, 3]
    assert all(("loss/on_policy" in line) == ("sample/length" in line) for line in interaction)
    assert any("loss/on_policy" in line for line in interaction)


@pytest.mark.parametrize(
    "config, shim, name",
    [
        ("fsdp2.yaml", "fsdp2_on_cpu.py", "FSDP2"),
        ("zero3.yaml", "deepspeed_on_cpu.py", "ZeRO-3"),
    ],
)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_sharded_launches_refuse_on_policy_in_one_line(written, tmp_path, config, shim, name):
    if name == "ZeRO-3":
        pytest.importorskip("deepspeed")
    env = ENV | {"ACCELERATE_USE_CPU": "true"}
    script = [str(Path(__file__).parent / shim)]
    command = _launch(config, script) + _train(written, tmp_path, "interact.max_steps=1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    line = f"interact.on_policy=0.5 is not supported under {name}"
    assert line in result.stderr, result.stderr[-3000:]
    # refused before stage 1 (`preflight.refuse_on_policy_under_sharding`): nothing verbalized, nothing trained
    assert not (tmp_path / "verbalizers").exists() and not (tmp_path / "metrics.jsonl").exists()
