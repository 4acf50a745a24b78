"""`vlsi train` / `verbalize` / `sft` through the real CLI on tiny local checkpoints and real images."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from commands import CONFIG, HOLD_LOCK, train_argv
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlsi.cli import main
from vlsi.models.tiny import build_tiny_vlm, build_tokenizer
from vlsi.models.verbalizer import Verbalizers
from vlsi.toy import write_digits_dataset, write_tiny_pair

SHORT = ["verbalize.max_steps=3", "interact.max_steps=3", "sft.max_steps=3", "interact.grad_accum=2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    teacher, student = write_tiny_pair(root)
    data = write_digits_dataset(root, n=12)
    return root, str(teacher), str(student), str(data)


def _train(toy, out, *extra):
    _, teacher, student, data = toy
    return main(train_argv(teacher, student, data, out, *SHORT, *extra))


def _generate(directory: Path, image: Path) -> str:
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])[0]


def test_train_end_to_end(toy, tmp_path):
    out = tmp_path / "run"
    assert _train(toy, out) == 0

    for name in [
        "config.yaml",
        "metrics.jsonl",
        "layer_match.jsonl",
        "layer_match.png",
        "verbalizer_loss.png",
        "verbalizers/teacher/verbalizers.safetensors",
        "verbalizers/student/verbalizers.json",
        "student/config.json",
        "student/model.safetensors",
        "student/processor_config.json",
        "student/README.md",
    ]:
        assert (out / name).is_file(), name
    card = ModelCard.load(out / "student" / "README.md")
    _, teacher, student, data = toy
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert "vlsi train" in card.text and "VLsI" in card.text and f"`{teacher}`" in card.text
    assert f"`{student}`" in card.text and f"`{data}` (fingerprint `" in card.text and "not recorded`)" not in card.text

    teacher_meta = json.loads((out / "verbalizers/teacher/verbalizers.json").read_text())
    student_meta = json.loads((out / "verbalizers/student/verbalizers.json").read_text())
    assert teacher_meta["target_layers"] == [0, 2, 4] and student_meta["target_layers"] == [0, 2]  # tiny-cpu rule

    matches = [json.loads(line) for line in (out / "layer_match.jsonl").read_text().splitlines()]
    assert len(matches) == 3 * 2  # interact.max_steps x grad_accum
    assert all(len(m["match"]) == 2 and m["match"][0] < m["match"][1] <= 2 for m in matches)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = [m["stage"] for m in metrics]
    assert stages == ["verbalize/teacher"] * 3 + ["verbalize/student"] * 3 + ["interact"] * 3 + ["sft"] * 3
    assert {"loss/layer0", "loss/layer2", "loss/layer4"} <= set(metrics[0])
    assert {"kl/layer0", "kl/layer2", "last"} <= set(metrics[6])

    with safe_open(out / "student" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora_" in k or "verbalizer" in k or "ffns" in k], "a plain student checkpoint"
    with safe_open(Path(toy[2]) / "model.safetensors", "pt") as f:
        assert sorted(keys) == sorted(f.keys()), "same architecture and layout as the input student"
    assert isinstance(_generate(out / "student", next((toy[0] / "images").glob("*.png"))), str)

    # Re-running the same command reuses every finished stage.
    assert _train(toy, out) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(metrics)


def test_rerun_with_another_config_is_refused(toy, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 5\n")
    assert _train(toy, out) == 2
    assert "holds a run made with other settings (" in capsys.readouterr().err


@pytest.mark.parametrize("models, missing", [("[teacher]", "student"), ("[student]", "teacher")])
def test_a_model_left_out_of_verbalize_models_without_verbalizers_is_refused_before_any_stage(
    toy, tmp_path, capsys, models, missing
):
    """Stage 1 would verbalize the other model first and only then find nothing for this one: `vlsi train` refuses
    before anything trains (`preflight.refuse_missing_verbalizers`), in one line naming the setting and the folder."""
    out = tmp_path / "run"
    assert _train(toy, out, f"verbalize.models={models}") == 2
    err = capsys.readouterr().err
    assert f"verbalize.models leaves out the {missing}, but {out / 'verbalizers' / missing} does not exist" in err
    assert "Traceback" not in err and not (out / "verbalizers").exists() and not (out / "metrics.jsonl").exists()


def test_a_finished_run_whose_inputs_changed_is_refused_not_reused(tmp_path, capsys):
    """The data's answers edited, then the teacher's weights changed in place (same sizes), behind the same settings:
    the rerun stops before any stage is reused or resumed, naming what changed."""
    root = tmp_path / "toy"
    teacher, student = write_tiny_pair(root)
    data = write_digits_dataset(root, n=8)
    out = tmp_path / "run"
    argv = train_argv(teacher, student, data, out, *SHORT)
    assert main(argv) == 0
    inputs = json.loads((out / "inputs.json").read_text())
    assert set(inputs) == {"teacher", "student", "data"}
    original = data.read_text()
    records = json.loads(original)
    records[0]["conversations"][1]["value"] += " (edited)"
    data.write_text(json.dumps(records))  # one answer edited
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds a run made with other settings (data (its records or images)); it is not reused" in (
        capsys.readouterr().err
    )
    data.write_text(original)
    weights = load_file(Path(teacher) / "model.safetensors")
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 1}, Path(teacher) / "model.safetensors", metadata={"format": "pt"})
    assert main(argv) == 2
    assert "(teacher (its files))" in capsys.readouterr().err
    assert json.loads((out / "inputs.json").read_text()) == inputs, "the record keeps what the stages were made from"


def test_a_second_run_on_a_folder_in_use_stops_naming_the_holder(toy, tmp_path, capsys):
    """A real second process holds OUT (a run in progress): `vlsi train` and `vlsi sft` into it stop in one line."""
    _, teacher, student, data = toy
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(train_argv(teacher, student, data, out, *SHORT)) == 2
        err = capsys.readouterr().err
        assert f"vlsi train: error: {out} is in use by another run (pid {holder.pid} on " in err
        assert err.count("\n") == 1
        assert main(["sft", "--model", student, "--data", data, "--output", str(out), "--config", CONFIG]) == 2
        assert f"in use by another run (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "config.yaml").exists(), "nothing was written into the folder in use"


def test_different_tokenizers_stop_before_loading(toy, tmp_path):
    other = build_tokenizer(corpus="a wholly different corpus of words " * 20, vocab_size=320)
    build_tiny_vlm(tmp_path / "alien", tokenizer=other)
    root, teacher, _, data = toy
    command = [sys.executable, "-m", "vlsi", *train_argv(teacher, tmp_path / "alien", data, tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "different tokenizers" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "verbalizers").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["verbalizer.teacher_layers=[1]", "verbalizer.student_layers=[0,1]"], "student has 2 target layers"),
        (["teacher_verbalizers={other}"], "hidden size 32, but"),
        (["teacher_verbalizers={mine}", "verbalizer.teacher_layers=[0,1]"], "verbalizer.teacher_layers=[0, 1], but"),
        (["teacher_verbalizers={mine}", "verbalizer.student_layers=[0,1,2,3]"], "student has 4 target layers"),
    ],
)
def test_layer_mistakes_stop_before_anything_trains(toy, tmp_path, capsys, extra, message):
    """Target-layer counts and copied verbalizers are checked from the model configs before any stage runs."""
    _, teacher, _, _ = toy
    Verbalizers(32, [0], family="qwen2_vl").save(tmp_path / "other")
    hidden = AutoModelForImageTextToText.from_pretrained(teacher).config.text_config.hidden_size
    Verbalizers(hidden, [0, 2], family="qwen2_vl").save(tmp_path / "mine")
    extra = [e.format(other=tmp_path / "other", mine=tmp_path / "mine") for e in extra]
    assert _train(toy, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "verbalizers").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_llava_onevision_pair(tmp_path):
    tokenizer = build_tokenizer("llava_onevision")
    build_tiny_vlm(tmp_path / "t", family="llava_onevision", hidden=96, layers=6, vocab_pad=32, tokenizer=tokenizer)
    build_tiny_vlm(tmp_path / "s", family="llava_onevision", layers=4, tokenizer=tokenizer, seed=1)
    data = write_digits_dataset(tmp_path, n=6)
    out = tmp_path / "run"
    argv = train_argv(
        tmp_path / "t",
        tmp_path / "s",
        data,
        out,
        "verbalize.max_steps=2",
        "interact.max_steps=2",
        "sft.max_steps=2",
        "verbalize.batch_size=2",
        "interact.batch_size=2",
        "sft.batch_size=2",
    )
    assert main(argv) == 0
    assert _generate(out / "student", next((tmp_path / "images").glob("*.png"))) is not None


def test_verbalize_and_sft_alone(toy, tmp_path):
    _, _, student, data = toy
    assert (
        main(
            [
                "verbalize",
                "--model",
                student,
                "--data",
                data,
                "--output",
                str(tmp_path / "v"),
                "--config",
                CONFIG,
                "verbalize.max_steps=2",
            ]
        )
        == 0
    )
    assert (tmp_path / "v" / "verbalizers" / "verbalizers.safetensors").is_file()
    sft = ["sft", "--model", student, "--data", data, "--output", str(tmp_path / "s"), "--config", CONFIG]
    result = subprocess.run([sys.executable, "-m", "vlsi", *sft, "sft.max_steps=2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # transformers imports DeepSpeed (when installed) to save the model; its no-GPU notice is not shown
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "s" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    card = ModelCard.load(tmp_path / "s" / "model" / "README.md")
    assert "vlsi sft" in card.text and "| teacher | none |" in card.text and "sft" in card.data.tags


def test_sft_rerun_reuses_its_model_and_refuses_other_settings_or_inputs(toy, tmp_path, capsys, caplog):
    _, _, student, data = toy
    model = tmp_path / "student"
    shutil.copytree(student, model)
    out = tmp_path / "s"
    sft = ["sft", "--model", str(model), "--data", data, "--output", str(out), "--config", CONFIG, "sft.max_steps=2"]
    assert main(sft) == 0
    written = (out / "model" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="vlsi"):
        assert main(sft) == 0
    assert f"model: reusing {out / 'model'}" in caplog.text
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == written, "not trained again"
    exported = (out / "model" / "model.safetensors").read_bytes()
    (out / "model" / "model.safetensors").write_bytes(exported[:-100])  # truncated: never reported as finished
    capsys.readouterr()
    assert main(sft) == 2
    assert f"{out / 'model' / 'model.safetensors'}: damaged" in capsys.readouterr().err
    (out / "model" / "model.safetensors").unlink()
    assert main(sft) == 2
    assert f"{out / 'model' / 'model.safetensors'}: missing; delete {out / 'model'}" in capsys.readouterr().err
    (out / "model" / "model.safetensors").write_bytes(exported)
    capsys.readouterr()
    assert main([*sft, "sft.lr=0.5"]) == 2
    assert "made with other settings (sft.lr: " in capsys.readouterr().err
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 1}, model / "model.safetensors", metadata={"format": "pt"})
    assert main(sft) == 2
    assert "made with other settings (model (its files)); it is not reused" in capsys.readouterr().err


def test_help_explains_the_commands():
    result = subprocess.run([sys.executable, "-m", "vlsi", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--teacher" in result.stdout and "key=value" in result.stdout
    assert "settings most runs change" in result.stdout and "teacher_cache=DIR" in result.stdout
    common = {"verbalize": "verbalizer.student_layers", "sft": "sft.lora.r", "cache": "cache.top_k"}
    for command, setting in common.items():
        result = subprocess.run([sys.executable, "-m", "vlsi", command, "--help"], capture_output=True, text=True)
        assert "settings most runs change" in result.stdout and setting in result.stdout, command


def test_bad_dataset_gets_one_report_and_no_traceback(toy, tmp_path):
    root, teacher, student, _ = toy
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = next((root / "images").glob("*.png"))
    records = [
        {
            "id": "ok",
            "image": str(good),
            "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "7"}],
        },
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "7"}],
        },
        {
            "id": "corrupt",
            "image": "broken.png",
            "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "7"}],
        },
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Hi"}]},
        {
            "id": "placeholders",
            "image": str(good),
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "7"}],
        },
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    command = [sys.executable, "-m", "vlsi", *train_argv(teacher, student, data, tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for needle in ("missing", "corrupt", "no-answer", "placeholders", "line 6"):
        assert needle in result.stderr, needle
    result = subprocess.run(
        [*command, "data.skip_invalid=true", "verbalize.max_steps=1", "interact.max_steps=1", "sft.max_steps=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 5 invalid records" in result.stderr


def test_tensorboard_logging_when_asked(toy, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _train(toy, out, "report_to=[tensorboard]") == 0
    runs = {p.name for p in (out / "logs").iterdir()}
    assert runs == {"verbalize-teacher", "verbalize-student", "interact", "sft"}
    events = EventAccumulator(str(out / "logs" / "interact")).Reload()
    assert {"loss", "last", "kl/layer0"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("loss")) == 3


def test_settings_are_accepted_anywhere_on_the_command_line(capsys):
    from vlsi.cli import parse_args

    args = parse_args(["train", "--teacher", "T", "a.b=1", "--data", "D", "--output", "O", "c=2", "a.b=3"])
    assert (args.teacher, args.data, args.output) == ("T", ["D"], "O")  # --data repeats: a mixture
    assert args.settings == ["a.b=1", "c=2", "a.b=3"], "in command-line order: the last value of a key wins"
    for command in ("demo", "ablate", "study"):
        args = parse_args([command, "seeds=2", "--output", "d", "seed=3", "--fast", "n_pool=5"])
        assert (args.output, args.fast, args.settings) == ("d", True, ["seeds=2", "seed=3", "n_pool=5"]), command
    with pytest.raises(SystemExit) as stop:
        parse_args(["train", "--teacher", "T", "a=1", "--output", "O", "stray", "--bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: stray --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        parse_args(["score", "--benchmark", "pope", "a=1", "--predictions", "p.tsv"])
    assert stop.value.code == 2 and "unrecognized arguments: a=1" in capsys.readouterr().err, "score takes none"


def test_score_and_eval_share_the_rules_and_judge_arguments(capsys):
    from vlsi.cli import parse_args

    tails = []
    for command in ("score", "eval"):
        with pytest.raises(SystemExit):
            parse_args([command, "--help"])
        text = capsys.readouterr().out
        tails.append(text[text.index("  --rules") :])  # the last arguments of both
    assert tails[0] == tails[1]
    for option in ("--judge-url", "--judge-model", "--judge-key-env", "OPENAI_API_KEY", "score_lenient"):
        assert option in tails[0], option


def test_experiment_help_lists_the_settings(capsys):
    from vlsi.cli import parse_args

    for command, names in [("demo", ["n_labelled", "seed"]), ("ablate", ["seeds", "tables"]), ("study", ["sizes"])]:
        with pytest.raises(SystemExit):
            parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"{command} settings: tasks, styles, n_labelled" in text and all(f" {n}" in text for n in names)


def test_the_parser_and_vlsi_score_leave_torch_unloaded(tmp_path):
    """`vlsi --help`, a usage error and `vlsi score` answer at once: torch is imported by the commands that need it."""
    predictions = tmp_path / "pope.tsv"
    predictions.write_text("answer\tprediction\nYes\tYes\n")
    code = (
        "import sys; from vlsi.cli import main; "
        f"code = main(['score', '--benchmark', 'pope', '--predictions', {str(predictions)!r}]); "
        "print(code, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "0 False", result.stdout + result.stderr


def test_a_failed_run_is_one_line_and_any_other_runtime_error_a_traceback(tmp_path, monkeypatch, capsys):
    import vlsi.demo.study as study
    from vlsi.demo.ablate import RunFailed

    def failed(out, settings, fast):
        raise RunFailed("n8 seed 0 failed (boom); its log: runs/n8-seed0/log.txt")

    monkeypatch.setattr(study, "run_study", failed)
    assert main(["study", "--fast", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "vlsi study: error: n8 seed 0 failed (boom); its log: runs/n8-seed0/log.txt"
    ]

    def bug(out, settings, fast):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(study, "run_study", bug)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        main(["study", "--fast", "--output", str(tmp_path)])
