"""The model card every exported student carries: `README.md` in its folder, written with `huggingface_hub`'s
`ModelCard`, so the folder uploads to the hub as it is (`hf upload USER/NAME OUT/student`) and tells a reader a
month later what made it.

    student_card(cfg, command, data_fingerprint) -> ModelCard    base model, teacher, data and its fingerprint,
                                                                 method, stage settings, vlsi version, licenses
    add_eval_result(folder, benchmark, score) -> bool            a `vlsi eval` score into the card's model-index

The card's metadata (YAML front matter) holds `base_model`, `license` (the base model's, read from its own card when
its folder has one), `library_name: transformers`, `pipeline_tag: image-text-to-text`, tags, and, once `vlsi eval`
scored the folder, `model-index` results; the text holds everything else.
"""

from __future__ import annotations

import dataclasses
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import TrainConfig

CARD = "README.md"
METHOD = {
    "train": "VLsI (Verbalized Layers-to-Interactions): verbalizers for both models (stage 1), layer-wise "
    "interaction with adaptive layer matching (stage 2), supervised fine-tuning (stage 3)",
    "sft": "supervised fine-tuning (next-token cross-entropy on the assistant turns)",
}
STAGES = {"train": ("verbalizer", "verbalize", "interact", "sft"), "sft": ("sft",)}


def student_card(cfg: TrainConfig, command: str, data_fingerprint: str | None) -> ModelCard:
    """The card of a student made by `vlsi <command>` (train or sft) under `cfg`."""
    base = cfg.student
    license_, base_license = _license(base)
    teacher = cfg.teacher if command == "train" or cfg.data.answers != "gold" else ""
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        license=license_,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["vlsi", "distillation" if teacher else "sft", "vision-language"],
        model_name=Path(cfg.output).name,
    )
    settings = {name: dataclasses.asdict(getattr(cfg, name)) for name in STAGES[command]}
    lines = [
        f"# {Path(cfg.output).name}",
        "",
        f"A vision-language model made with [vlsi](https://pypi.org/project/vlsi/) {_vlsi_version()} "
        f"(`vlsi {command}`).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` (license: {base_license}) |",
        f"| teacher | {f'`{teacher}` (license: {_license(teacher)[1]})' if teacher else 'none'} |",
        f"| method | {METHOD[command]} |",
        f"| data | `{cfg.data.path}` (fingerprint `{data_fingerprint or 'not recorded'}`) |",
        f"| answers | {_answers(cfg)} |",
        f"| precision | {cfg.precision} |",
        f"| seed | {cfg.seed} |",
        "",
        "A model trained on a teacher's outputs may be bound by the teacher's license as well as the base model's: "
        "read both before you publish it.",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True),
        "```",
        "",
        "## Scores",
        "",
        "Scores of `vlsi eval` runs on this folder are added to the model-index above as they are made.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def add_eval_result(folder: str | Path, benchmark: str, score: float, split: str | None = None) -> bool:
    """Add (or replace) the `vlsi eval` score of `benchmark` in the model-index of the card in `folder`; False when
    the folder has no card (a model vlsi did not make)."""
    path = Path(folder) / CARD
    if not path.is_file():
        return False
    card = ModelCard.load(path)
    results = [r for r in card.data.eval_results or [] if r.dataset_name != benchmark]
    results.append(
        EvalResult(
            task_type="image-text-to-text",
            dataset_type=benchmark,
            dataset_name=benchmark,
            dataset_split=split,
            metric_type="accuracy",
            metric_name="vlsi eval",
            metric_value=round(float(score), 2),
        )
    )
    card.data.eval_results = results
    card.data.model_name = card.data.model_name or Path(folder).name
    tmp = path.with_name(f"{CARD}.tmp")
    card.save(tmp)
    tmp.replace(path)
    return True


def _license(model: str) -> tuple[str | None, str]:
    """(the license id for the metadata, how the text names it) of a model, read from its folder's own card."""
    path = Path(model) / CARD if model else None
    if path is not None and path.is_file():
        try:
            found = ModelCard.load(path).data.license
        except (ValueError, OSError):
            found = None
        if found:
            return found, f"`{found}`"
    where = "its hub page" if _is_hub_id(model) else "its folder has no card naming it"
    return None, f"not recorded ({where})"


def _is_hub_id(name: str) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1


def _answers(cfg: TrainConfig) -> str:
    if cfg.data.answers == "gold":
        return "the data's own (gold) answers"
    return f"answered by the teacher (`data.answers={cfg.data.answers}`, at most {cfg.data.answer_max_tokens} tokens)"


def _vlsi_version() -> str:
    try:
        return version("vlsi")
    except PackageNotFoundError:
        from . import __version__

        return __version__
