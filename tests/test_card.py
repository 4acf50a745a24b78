"""The model card of an exported student: metadata the hub reads, the base model's license, eval scores added."""

from huggingface_hub import ModelCard

from vlsi.card import add_eval_result, student_card
from vlsi.config import TrainConfig


def _cfg(tmp_path, **changes) -> TrainConfig:
    cfg = TrainConfig(
        teacher="Qwen/Qwen2-VL-72B-Instruct", student=str(tmp_path / "base"), output=str(tmp_path / "run")
    )
    cfg.data.path = "train.jsonl"
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_card_names_what_made_the_student_and_the_base_models_license(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    card = student_card(_cfg(tmp_path), "train", "abc123")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.base_model is None  # a local folder is no hub id; the text names it
    assert f"`{tmp_path / 'base'}` (license: `apache-2.0`)" in loaded.text
    assert "`Qwen/Qwen2-VL-72B-Instruct` (license: not recorded (its hub page))" in loaded.text
    assert "`train.jsonl` (fingerprint `abc123`)" in loaded.text
    assert '"interact": {' in loaded.text and '"top_k"' not in loaded.text  # stage settings, not the cache's


def test_a_hub_base_model_is_recorded_as_base_model(tmp_path):
    card = student_card(_cfg(tmp_path, student="Qwen/Qwen2-VL-2B-Instruct"), "sft", None)
    assert card.data.base_model == "Qwen/Qwen2-VL-2B-Instruct"
    assert "fingerprint `not recorded`" in card.text and "| teacher | none |" in card.text


def test_eval_scores_go_into_the_model_index_replacing_an_earlier_score(tmp_path):
    student_card(_cfg(tmp_path), "train", "abc").save(tmp_path / "README.md")
    assert add_eval_result(tmp_path, "MMBench_DEV_EN", 61.234)
    assert add_eval_result(tmp_path, "POPE", 80.0)
    assert add_eval_result(tmp_path, "MMBench_DEV_EN", 62.5)
    results = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert sorted((r.dataset_name, r.metric_value) for r in results) == [("MMBench_DEV_EN", 62.5), ("POPE", 80.0)]
    assert not add_eval_result(tmp_path / "elsewhere", "POPE", 1.0)  # no card: a model vlsi did not make


def test_a_score_written_into_the_card_leaves_the_folder_reusable(tmp_path):
    """The card is outside the stage output's checksums: `vlsi eval` writing into it does not make a rerun of
    `vlsi train` refuse the finished student."""
    from vlsi.runfolder import record_checksums, verify_checksums

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    student_card(_cfg(tmp_path), "train", "abc").save(tmp_path / "README.md")
    record_checksums(tmp_path)
    assert add_eval_result(tmp_path, "POPE", 80.0)
    verify_checksums(tmp_path, "rerun")
