"""The `vlsi` command: one subcommand per function.

vlsi train --teacher T --student S --data train.json --image-root imgs --output OUT [--config F.yaml] [k=v ...]
vlsi verbalize --model M --data train.json --output OUT [k=v ...]
vlsi cache --teacher T --data train.json --output C teacher_verbalizers=DIR [cache.top_k=64] [k=v ...]
vlsi sft --model M --data train.json --output OUT [--teacher T data.answers=teacher] [k=v ...]
vlsi eval --model M --benchmark NAME --data FILE --output OUT
vlsi score --benchmark NAME --predictions FILE
vlsi explain --model M --verbalizers V --image IMG --question TEXT
vlsi demo --output DIR [--fast]
vlsi ablate --output DIR [--fast]
vlsi study --output DIR [--fast]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

OVERRIDES_HELP = (
    "settings as key=value, anywhere on the line; they override the config file: e.g. interact.max_steps=200 "
    "interact.match.strategy=bottom_k verbalizer.student_layers=[2,6,10]. Unknown keys are errors; "
    "see configs/ and docs/CONFIG.md for every key"
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="training records: LLaVA-style or OpenAI-style JSON / JSONL")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the data file's folder)")
    p.add_argument(
        "--output", required=True, help="output folder; re-running with the same folder reuses finished stages"
    )
    p.add_argument("--config", help="YAML file of settings (e.g. configs/qwen2vl-72b-to-7b.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _config(args, **top):
    from .config import load_config

    data = {"path": args.data, "image_root": args.image_root}
    cfg = load_config(args.config, args.overrides, output=args.output, **top)
    for key, value in data.items():
        if value is not None:
            setattr(cfg.data, key, value)
    if not cfg.data.path:
        raise ValueError("--data (or data.path in the config) is required")
    return cfg


def cmd_train(args) -> int:
    from .distributed import process_state
    from .pipeline import run_train

    cfg = _config(args, teacher=args.teacher, student=args.student)
    final = run_train(cfg)
    if process_state().is_main_process:
        print(f"student written to {final}")
    return 0


def _one_stage(args, folder: str, run, **top) -> int:
    """`vlsi verbalize` / `vlsi sft`: one stage on --model; writes OUT/config.yaml, OUT/metrics.jsonl, OUT/<folder>."""
    from .config import save_config
    from .distributed import process_state
    from .stages.loop import MetricsLog

    cfg = _config(args, student=args.model, **top)
    out = Path(cfg.output)
    state = process_state()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    state.wait_for_everyone()
    run(cfg, out / folder, MetricsLog(out / "metrics.jsonl"))
    if state.is_main_process:
        print(f"{folder} written to {out / folder}")
    return 0


def cmd_verbalize(args) -> int:
    from .stages.common import load_samples
    from .stages.verbalize import verbalize

    # Samples first: with data.answers=teacher (and teacher=PATH) the teacher answers before the model loads.
    return _one_stage(
        args,
        "verbalizers",
        lambda cfg, out, metrics: verbalize(cfg, args.model, args.who, out, metrics, load_samples(cfg)),
    )


def cmd_sft(args) -> int:
    from .config import ConfigError
    from .stages.common import load_samples
    from .stages.sft import sft

    def run(cfg, out, metrics):
        if args.teacher and cfg.data.answers != "teacher":
            raise ConfigError("--teacher is only used to answer prompts: add data.answers=teacher, or drop --teacher")
        # Samples first: with data.answers=teacher the teacher answers (and leaves memory) before the model loads.
        return sft(cfg, args.model, out, metrics, load_samples(cfg))

    return _one_stage(args, "model", run, teacher=args.teacher)


def cmd_cache(args) -> int:
    from .cache import build_cache
    from .config import ConfigError, save_config
    from .distributed import process_state
    from .models.verbalizer import META, WEIGHTS

    cfg = _config(args, teacher=args.teacher)
    if not cfg.teacher_verbalizers:
        raise ConfigError(
            "vlsi cache needs the teacher's verbalizers: add teacher_verbalizers=DIR (from `vlsi verbalize --who "
            "teacher`, or OUT/verbalizers/teacher of a `vlsi train` run)"
        )
    missing = [n for n in (META, WEIGHTS) if not (Path(cfg.teacher_verbalizers) / n).is_file()]
    if missing:
        raise ConfigError(f"teacher_verbalizers={cfg.teacher_verbalizers}: no {' or '.join(missing)} there")
    out = Path(cfg.output)
    if process_state().is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    build_cache(cfg, out, cfg.teacher_verbalizers)
    if process_state().is_main_process:
        print(f"teacher cache written to {out}; train from it with teacher_cache={out}")
    return 0


SETTINGS_MOST_CHANGED = """settings most runs change (every key: docs/CONFIG.md):
  verbalize.max_steps, interact.max_steps, sft.max_steps     optimizer steps of each stage
  interact.lr, interact.batch_size, interact.grad_accum      (and the same for verbalize., sft.)
  interact.lora.enabled=false, sft.lora.r=64                 full fine-tuning, or the LoRA rank
  verbalizer.teacher_layers=[...], verbalizer.student_layers=[...]   target blocks (default: every 4th from 2)
  teacher_verbalizers=DIR                                    reuse the teacher's verbalizers (vlsi verbalize)
  teacher_cache=DIR                                          train from the teacher's cached targets (vlsi cache)
  data.answers=teacher                                       the teacher answers records without an answer
  precision=bf16|fp32, seed=N, checkpoint.every=N
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlsi",
        description="VLsI: distil a large vision-language model into a small one, layer by layer, through verbalizers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="verbalize -> interact -> SFT: the whole method, one command",
        description="Distil TEACHER into STUDENT with VLsI. Stages already finished in --output are reused.",
        epilog=SETTINGS_MOST_CHANGED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", help="teacher model: a local directory or a hub id")
    p.add_argument("--student", help="student model (same tokenizer as the teacher)")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "verbalize",
        help="train verbalizers for one model (stage 1 alone)",
        description="Train a verb-FFN per target layer of MODEL (backbone frozen); writes OUTPUT/verbalizers.",
    )
    p.add_argument("--model", required=True, help="model: a local directory or a hub id")
    p.add_argument(
        "--who",
        choices=["teacher", "student"],
        default="student",
        help="which target-layer setting to use (verbalizer.teacher_layers or student_layers)",
    )
    _common(p)
    p.set_defaults(func=cmd_verbalize)

    p = sub.add_parser(
        "sft",
        help="plain supervised fine-tuning of any supported VLM (stage 3 alone)",
        description="Fine-tune MODEL on the data (LoRA merged at the end); writes OUTPUT/model.",
    )
    p.add_argument("--model", required=True, help="model: a local directory or a hub id")
    p.add_argument(
        "--teacher", help="with data.answers=teacher: the model that answers records ending with a user turn"
    )
    _common(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "cache",
        help="run the teacher once and cache its verbalized targets, for training students without it",
        description="Cache the top-k of every teacher target layer's verbalized distribution and of its output, per "
        "response token (docs/CACHE.md); `vlsi train ... teacher_cache=OUTPUT` then never loads the teacher.",
    )
    p.add_argument("--teacher", required=True, help="teacher model: a local directory or a hub id")
    _common(p)
    p.set_defaults(func=cmd_cache)

    from .demo import add_ablate_parser, add_study_parser
    from .demo import add_parser as add_demo_parser
    from .eval.harness import add_parser as add_eval_parser
    from .eval.score import add_parser as add_score_parser
    from .explain import add_parser as add_explain_parser

    add_eval_parser(sub)
    add_score_parser(sub)
    add_explain_parser(sub)
    add_demo_parser(sub)
    add_ablate_parser(sub)
    add_study_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `key=value` settings accepted anywhere on it (argparse takes only the first run of
    them as the positional list; the later ones come back unrecognised and are appended in order, so the last
    value of a key still wins). Anything else unrecognised is an error, as usual."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    field = next((name for name in ("overrides", "settings") if hasattr(args, name)), None)
    stray = [x for x in extra if field is None or x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if field is not None:
        getattr(args, field).extend(extra)
    return args


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .models.loading import ModelError
    from .stages.loop import NonFiniteLoss

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like (an OSError: handled first)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except (ConfigError, DataError, ModelError, NonFiniteLoss, OSError, ValueError) as e:  # bad input: one line
        print(f"vlsi {args.command}: error: {str(e).strip()}", file=sys.stderr)
        code = 2
    end_process_group(synchronise=code == 0)
    return code


def end_process_group(synchronise: bool) -> None:
    """Close the process group of a distributed launch before the interpreter exits. A gloo or NCCL group left
    open keeps its C++ worker threads alive into interpreter teardown, where they abort the process now and then
    (SIGABRT, "terminate called without an active exception") after all the work is done. `synchronise`: wait for
    every process first (on success; after an error another process may never arrive)."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to close (and torch stays unloaded)
    if dist is not None and dist.is_available() and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
