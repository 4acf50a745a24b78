from pathlib import Path

import pytest

from vlsi.config import ConfigError, TrainConfig, load_config, parse_override, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.interact.lora.r == 64 and cfg.interact.lora.alpha == 64
    assert cfg.interact.match.strategy == "adaptive" and cfg.interact.match.scale == 2.0
    assert cfg.interact.divergence == "forward" and cfg.interact.last_loss == "kld"
    assert cfg.verbalize.lr == 1e-4 and cfg.verbalize.min_lr == 1e-6 and cfg.verbalize.grad_accum == 16


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("interact:\n  max_steps: 7\n  match: {strategy: bottom_k}\nseed: 3\n")
    cfg = load_config(path, ["interact.max_steps=9", "verbalizer.student_layers=[0, 2]", "sft.lr=2e-5"])
    assert cfg.interact.max_steps == 9
    assert cfg.interact.match.strategy == "bottom_k"
    assert cfg.seed == 3
    assert cfg.verbalizer.student_layers == [0, 2]
    assert cfg.sft.lr == 2e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ("interact.max_step=3", "unknown setting 'interact.max_step'"),
        ("interact.max_steps=abc", "interact.max_steps: expected int"),
        ("interact.match.strategy=greedy", "interact.match.strategy='greedy' is not one of"),
        ("verbalizer.student_layers=3", "expected a list"),
        ("sft.batch_size=0", "sft.batch_size must be >= 1"),
        ("data.answers=silver", "data.answers='silver' is not one of gold, teacher"),
        ("data.answer_max_tokens=0", "data.answer_max_tokens must be >= 1"),
        ("data.answer_batch_size=0", "data.answer_batch_size must be >= 1"),
        ("interact.match.strategy=fixed", "needs interact.match.fixed"),
        ("interact.intermediate_weight=-0.5", "interact.intermediate_weight must be a finite number >= 0"),
        ("interact.intermediate_weight=.inf", "interact.intermediate_weight must be a finite number >= 0"),
        ("interact.intermediate_weight=heavy", "interact.intermediate_weight: expected a number"),
        ("interact.freeze_student_verbalizers=maybe", "interact.freeze_student_verbalizers: expected bool"),
        ("nokey", "is not key=value"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_no_layer_terms_and_no_last_layer_term_is_refused():
    with pytest.raises(ConfigError, match="interact.intermediate_weight=0 with interact.last_loss=none: nothing"):
        load_config(None, ["interact.intermediate_weight=0", "interact.last_loss=none"])


def test_bad_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("interact: {colour: red}\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown setting 'interact.colour'"):
        load_config(path)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["interact.match.fixed=[0,1]", "interact.match.strategy=fixed"], teacher="t")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_parse_override_nests():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    if cfg.verbalizer.teacher_layers is not None:
        assert len(cfg.verbalizer.student_layers) <= len(cfg.verbalizer.teacher_layers)


def test_presets_cover_the_paper_pairs():
    names = {p.stem for p in CONFIGS}
    assert {
        "qwen2vl-72b-to-7b",
        "qwen2vl-72b-to-2b",
        "qwen2vl-7b-to-2b",
        "llava-ov-72b-to-7b",
        "llava-ov-72b-to-0.5b",
    } <= names


def _keys(obj, prefix=""):
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_setting_is_documented():
    doc = (Path(__file__).parent.parent / "docs" / "CONFIG.md").read_text()
    stage_keys = {
        "max_steps",
        "lr",
        "min_lr",
        "warmup_steps",
        "weight_decay",
        "batch_size",
        "grad_accum",
        "max_grad_norm",
    }
    missing = []
    for key in _keys(TrainConfig()):
        leaf = key.rsplit(".", 1)[-1]
        if key.split(".")[0] in {"verbalize", "interact", "sft"} and leaf in stage_keys:
            key = f"STAGE.{leaf}"
        elif ".lora." in key:
            key = "." + leaf if key.startswith("interact") else "sft.lora.*"
        if key not in doc:
            missing.append(key)
    assert not missing, f"docs/CONFIG.md lacks {missing}"
