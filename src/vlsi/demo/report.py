"""DIR/report.md for `vlsi demo`: the comparison table, budget, plots and one test example read layer by layer.

Every number in the report is formatted from results.json (`write_report`), so the two always agree.
"""

from __future__ import annotations

from pathlib import Path

from .models import MODEL_SETS, STUDENT, TEACHER, model_size, student_folder
from .tasks import TASKS, Item, is_correct

ROWS = (
    ("teacher", "teacher (shipped)"),
    ("student_init", "student initialisation (shipped)"),
    ("student_sft", "student, (a) SFT only"),
    ("student_sft_teacher", "student, (b) SFT with the teacher's answers"),
    ("student_kd", "student, (c) final-layer KD, then SFT"),
    ("student_vlsi", "student, (d) VLsI: verbalize, interact, SFT"),
    ("student_kd_on_policy", "student, on-policy KD: (c) on its own samples too"),
    ("student_vlsi_on_policy", "student, on-policy VLsI: (d) on its own samples too"),
)
BY = {
    "teacher": "teacher",
    "student_init": "init",
    "student_sft": "sft",
    "student_sft_teacher": "sft_teacher",
    "student_kd": "kd",
    "student_vlsi": "vlsi",
    "student_kd_on_policy": "kd_on_policy",
    "student_vlsi_on_policy": "vlsi_on_policy",
}
STUDENT_NAMES = {
    "student_sft": "SFT only",
    "student_sft_teacher": "SFT with the teacher's answers",
    "student_kd": "final-layer KD",
    "student_vlsi": "VLsI",
    "student_kd_on_policy": "on-policy KD",
    "student_vlsi_on_policy": "on-policy VLsI",
}


def _split_name(r: dict) -> str:
    if r["settings"].get("eval_split", "test") == "test":
        return "Held-out test split"
    return "Validation split (settings being chosen: not the final numbers)"


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def command_line(command: str, out: Path, settings: dict) -> str:
    """The report's `- command:` line: the `vlsi <command>` that reruns it, then every setting."""
    fast = " --fast" if settings["fast"] else ""
    listed = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "fast")
    return f"- command: `vlsi {command} --output {out}{fast}`; settings {listed}"


def peak_memory(r: dict, child: str) -> str:
    """Peak memory of the main process and of its largest `child` process, from results.json."""
    memory = r["peak_memory_mib"]
    return f"peak memory {memory['main']:.0f} MiB (main process), {memory['largest_child']:.0f} MiB (largest {child})"


def _size(size: dict) -> str:
    return f"{size['layers']} layers x {size['hidden']}, vision depth {size['vision_depth']}"


def signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def noise(c: dict) -> str:
    """ "beyond noise" when the 95 % CI of a difference excludes 0; else whether TOST shows it equivalent within
    the stated margin (`stats.MARGIN`), or that it shows neither."""
    if c["low"] is None:
        return "no interval from one seed"
    if c["low"] > 0 or c["high"] < 0:
        return "beyond noise"
    margin = pct(c["margin"])
    if c["equivalent"]:
        return f"within noise, and equivalent within ±{margin} points (TOST, 5 %)"
    return f"within noise, but not shown equivalent within ±{margin} points"


def _compare(name: str, c: dict) -> str:
    """'3.1 points above SFT only (95 % CI +1.2 to +5.0: beyond noise; item-level McNemar p = 0.001)' from one
    seed's `experiment.comparisons` entry (the CI: a bootstrap over task x pattern clusters)."""
    diff = c["difference"]
    where = "above" if diff >= 0 else "below"
    return (
        f"{pct(abs(diff))} points {where} {name} (95 % CI {signed(c['low'])} to {signed(c['high'])}: {noise(c)}; "
        f"item-level McNemar p = {c['item_level']['p_mcnemar']:.2g})"
    )


def verdict(r: dict) -> str:
    """One paragraph saying what happened, from the numbers alone."""
    v, sft = r["student_vlsi"], r["student_sft"]
    paired = r["paired"]
    against = (("SFT only", "vlsi_vs_sft"), ("SFT with the teacher's answers", "vlsi_vs_sft_teacher"))
    text = "VLsI is " + ", ".join(_compare(name, paired[key]) for name, key in against)
    text += f" and {_compare('final-layer KD', paired['vlsi_vs_kd'])}."
    text += on_policy_verdict(r)
    best = max((key for key in STUDENT_NAMES if key in r), key=lambda key: r[key])
    text += f" Best student: {STUDENT_NAMES[best]}."
    gap = r["teacher"] - sft
    if gap > 0:
        shares = ", ".join(
            f"{name} {100 * (r[key] - sft) / gap:.0f} %"
            for key, name in (("student_sft_teacher", "SFT with the teacher's answers"), ("student_kd", "KD"))
        )
        closed = f"{100 * (v - sft) / gap:.0f} %"
        text += f" The teacher is {pct(gap)} points above SFT only; VLsI closes {closed} of that gap, {shares}."
    if len(r["seeds"]) == 1:
        text += (
            " One seed: these intervals are the test items' sampling noise for this training run, not the "
            "seed-to-seed spread; `vlsi study seeds=8` gives seed-level intervals (docs/DEMO.md#statistics)."
        )
    return text


def on_policy_verdict(r: dict) -> str:
    """With `on_policy=λ` > 0: each on-policy student against its off-policy recipe and against (b); "" without."""
    paired = r["paired"]
    if "vlsi_on_policy_vs_vlsi" not in paired:
        return ""
    answers = "SFT with the teacher's answers"
    return (
        f" On the student's own samples (λ = {r['settings']['on_policy']:g} of the interaction batches): on-policy KD "
        f"is {_compare('final-layer KD', paired['kd_on_policy_vs_kd'])} and "
        f"{_compare(answers, paired['kd_on_policy_vs_sft_teacher'])}; on-policy VLsI is "
        f"{_compare('VLsI', paired['vlsi_on_policy_vs_vlsi'])}, "
        f"{_compare(answers, paired['vlsi_on_policy_vs_sft_teacher'])} and "
        f"{_compare('on-policy KD', paired['vlsi_on_policy_vs_kd_on_policy'])}."
    )


def _table(r: dict) -> list[str]:
    tasks = [t for t in TASKS if t in r["by_task"]["teacher"]]
    head = ["model", "accuracy", "before its last SFT stage", *tasks, "training wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in (row for row in ROWS if row[0] in r):
        name = BY[key]
        before = r["before_sft"].get(name)
        cells = [pct(r["by_task"][name].get(t, 0.0)) for t in tasks]
        wall = "shipped" if name in ("teacher", "init") else f"{r['train_seconds'][name]:.0f} s"
        early = "" if before is None else pct(before)
        lines.append("| " + " | ".join([label, f"**{pct(r[key])}**", early, *cells, wall]) + " |")
    return lines


def _chains(r: dict) -> list[str]:
    """With chain answers: how often each model's whole chain is right (the table scores the answer after "so")."""
    if "chain_exact" not in r:
        return []
    shares = ", ".join(f"{label} {pct(r['chain_exact'][key])}" for key, label in ROWS_SHORT if key in r["chain_exact"])
    return [
        f'Chain answers ({r["answer_tokens"]} new tokens decoded at most): the table scores the number after "so"; '
        f"whole chains right (every intermediate result and the answer), in %: {shares}.",
        "",
    ]


def _budget(r: dict) -> list[str]:
    b, s = r["budget"], r["settings"]
    sec = r["train_seconds"]
    return [
        f"Every student starts from the same checkpoint and takes {b['examples_per_student']} training examples "
        f"({sum(b['sft'].values())} optimizer steps of batch {b['batch_size']}) in two stages with the same schedule "
        f"(each warms up for {100 * s['warmup']:.0f} % of its steps, then cosine from lr {s['lr']:g} to "
        f"{s['lr'] * s['min_lr_ratio']:g}):",
        "",
        "| method | data | stage 2 | stage 3 |",
        "|---|---|---|---|",
        f"| (a) SFT only | {s['n_labelled']} labelled questions | SFT {b['sft']['sft_1']} | SFT {b['sft']['sft']} |",
        f"| (b) SFT with the teacher's answers | the same + {s['n_pool']} answered by the teacher | "
        f"SFT {b['sft_teacher']['sft_1']} | SFT {b['sft_teacher']['sft']} |",
        f"| (c) final-layer KD | the same as (b) | KL to the teacher's output {b['kd']['kd']} | SFT {b['kd']['sft']} |",
        f"| (d) VLsI | the same as (b) | interaction {b['vlsi']['interact']} | SFT {b['vlsi']['sft']} |",
        *_on_policy_budget(r),
        "",
        f"- VLsI's stage 1 ({b['uncharged']['vlsi_verbalize']} steps training only the student's verb-FFNs on its "
        f"frozen backbone; no student weight changes) is not charged: it took {sec.get('vlsi_verbalize', 0):.0f} s, "
        "not in the wall time shown. The teacher's verbalizers ship with it, trained once "
        "(`scripts/train_demo_teacher.py`), as a teacher's verbalizers are reused for every student.",
        "- (b), (c) and (d) see the same questions and answers: (b) learns the teacher's answers as plain labels "
        "(sequence-level distillation), (c) adds the teacher's whole output distribution, (d) also its verbalized "
        "layers. KD and VLsI differ only in the matched layer-wise KL terms of stage 2: same data, steps, schedule, "
        "last-layer KL and SFT stage.",
        f"- The teacher answered the {s['n_pool']} unlabelled questions once ({sec.get('teacher_answers', 0):.0f} s, "
        "`data.answers=teacher`); SFT only has no teacher, so it trains on the labelled questions alone.",
        "- Teacher forward passes (KD, VLsI) are not charged: the budget counts the student's training examples. "
        f"The teacher ran once over the training questions into a cache both read ({sec.get('teacher_cache', 0):.0f} "
        "s, not in their wall times; docs/CACHE.md) instead of running at every step.",
        "- Same optimizer (AdamW), learning rate, batch, data order seed, full fine-tuning of the language model, "
        "frozen vision tower, LM head and (in stage 2) final norm, for all four.",
        *_stage3(s),
        *(
            [
                "- The on-policy students read no cache (it holds the fixed answers' targets only): the live teacher "
                "ran at each of their interaction steps, and its time, with the sampling's, is in their wall times."
            ]
            if "student_vlsi_on_policy" in r
            else []
        ),
    ]


def _stage3(s: dict) -> list[str]:
    """The stage-3 settings when they are not stage 2's (`stage3_lora`, `stage3_lr`)."""
    lora, lr = s.get("stage3_lora", 0), s.get("stage3_lr", 0.0) or s["lr"]
    if not lora and lr == s["lr"]:
        return []
    how = f"LoRA of rank {lora} (alpha {lora}, merged at its end)" if lora else "full fine-tuning"
    return [
        f"- Stage 3 (every student's last SFT stage) as the paper runs it: {how} of the language model, cosine from lr "
        f"{lr:g} to {lr * s['min_lr_ratio']:g} (settings `stage3_lora`, `stage3_lr`)."
    ]


def _on_policy_budget(r: dict) -> list[str]:
    """The on-policy students' rows of the budget table (none without `on_policy`)."""
    if "student_vlsi_on_policy" not in r:
        return []
    b, s = r["budget"], r["settings"]
    share = f"a share {s['on_policy']:g} of its batches answered by the student, scored by the live teacher"
    return [
        f"| on-policy KD | the same as (b) | (c)'s {b['kd']['kd']} steps, {share} | SFT {b['kd']['sft']} |",
        f"| on-policy VLsI | the same as (b) | (d)'s {b['vlsi']['interact']} steps, {share} | SFT {b['vlsi']['sft']} |",
    ]


STUDENT_PROBES = (
    ("init", "student initialisation"),
    ("kd", "KD, after interaction"),
    ("vlsi", "VLsI, after interaction"),
    ("vlsi_own", "VLsI, its own verbalizers"),
)


def _layers(r: dict) -> list[str]:
    """How often each verbalized layer names the answer (teacher forcing): the teacher's table, then one row per
    student and task."""
    acc = r["layer_accuracy"]
    teacher = acc["teacher"]
    columns = list(next(iter(teacher.values())))
    lines = ["| teacher | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([task, *(pct(v) for v in a.values())]) + " |" for task, a in teacher.items()]
    students = [(key, label) for key, label in STUDENT_PROBES if key in acc]
    if students:
        columns = list(next(iter(acc[students[0][0]].values())))
        lines += ["", "| student | task | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
        for key, label in students:
            lines += [
                "| " + " | ".join([label, task, *(pct(v) for v in a.values())]) + " |" for task, a in acc[key].items()
            ]
    return [*lines, ""]


def _example(example: dict | None) -> list[str]:
    if not example:
        return ["(no example: per-layer decoding was not available)"]
    item = example["item"]
    lines = [
        f"![test example]({example['image']})",
        "",
        f"Question: *{item['question']}*  Expected answer: **{item['answer']}**",
        "",
        "Final answers: "
        + ", ".join(
            f"{label} `{example['replies'][key] or '(empty)'}`"
            for key, label in ROWS_SHORT
            if key in example["replies"]
        )
        + ".",
        "",
    ]
    if example.get("table"):
        lines += [example["note"], "", "```", example["table"], "```"]
    else:
        lines.append(example["note"])
    return lines


ROWS_SHORT = (
    ("teacher", "teacher"),
    ("sft", "SFT only"),
    ("sft_teacher", "SFT with the teacher's answers"),
    ("kd", "KD"),
    ("vlsi", "VLsI"),
    ("kd_on_policy", "on-policy KD"),
    ("vlsi_on_policy", "on-policy VLsI"),
)


def _interaction(r: dict) -> list[str]:
    """One line on the interaction stage of each student that has one: last-layer KL, gradient norm, clipping."""
    labels = dict(ROWS_SHORT)
    parts = [
        f"{labels.get(m, m)} {d['last_kl_first_tenth']:.3f} -> {d['last_kl_last_tenth']:.3f}"
        + (
            f" (gradient norm median {d['grad_norm_median']:.2f}, {pct(d['clipped_share'])} % of steps clipped)"
            if "clipped_share" in d
            else ""
        )
        for m, d in r.get("interaction", {}).items()
    ]
    if not parts:
        return []
    return [
        "Interaction stage, last-layer KL to the teacher over its first and last tenth of steps: "
        + "; ".join(parts)
        + ".",
        "",
    ]


def write_report(out: Path, r: dict, example: dict | None) -> Path:
    s = r["settings"]
    card = r.get("teacher_card") or {}
    models = MODEL_SETS[s.get("teacher", "")]
    student = (
        f"Student: {_size(STUDENT)}, initialised from `{models.folder.name}/{models.student.name}/` (pretrained on "
        "reading single digits and counting only; compare and sequence questions are new to it)."
        if not s.get("student")
        else f"Student: {_size(model_size(student_folder(s['student'], models)))}, initialised from `{s['student']}` "
        "(setting `student`)."
    )
    lines = [
        "# vlsi demo: SFT only vs SFT with the teacher's answers vs final-layer KD vs VLsI",
        "",
        f"{_split_name(r)}: **{r['n_test']} questions** (images never seen in training), chance level "
        f"{pct(r['chance'])} %. Accuracy in %, greedy decoding, exact match after normalisation. The "
        f"{r['n_test']} questions fall into {r['n_clusters']} task x pattern clusters (a digit pair, a sequence's "
        "start and step): the 95 % intervals of the paired differences below resample them as units (a cluster "
        "bootstrap); McNemar's p, item-level, counts the questions as independent.",
        "",
        *_table(r),
        "",
        *_chains(r),
        verdict(r),
        "",
        *_interaction(r),
        f"Teacher: Qwen2-VL architecture, {_size(TEACHER)}, trained from scratch "
        f"(`{card.get('command', 'scripts/train_demo_teacher.py')}`). {student}",
        "",
        "## Budget",
        "",
        *_budget(r),
        "",
        "## Task",
        "",
        "Images are 112 x 28: four slots of one image token each, holding scikit-learn's handwritten digits "
        "(test digits come from 20 % of the images that training never uses) or drawn shapes. "
        f"Tasks: {s['tasks']} (of: read a digit, count shapes, compare two digits, continue a sequence of three "
        f"digits); answered as: {s['styles']} (of: a number, yes/no, a multiple-choice letter). The student's "
        "initialisation reads digits and counts shapes but has never compared or continued a sequence.",
        "",
        "## What each layer knows",
        "",
        "How often each verbalized layer's most likely next token after the question is the answer (teacher "
        "forcing), per task. The teacher reads through its shipped verbalizers; the student initialisation through "
        "VLsI's stage-1 verbalizers; the KD and VLsI students after their interaction stage through fresh "
        f"verbalizers trained the same way ({s['verbalize_steps']} steps of stage 1 on the frozen student: the same "
        "probe for both, not charged to either); last, the VLsI student through the verbalizers trained alongside it.",
        "",
        *_layers(r),
        "## Per-layer verbalizer loss",
        "",
        "![verbalizer loss](verbalizer_loss.png)",
        "",
        "Left: this run's student verbalizers (VLsI stage 1, student backbone frozen); right: the shipped "
        "teacher's verbalizers, recorded when they were trained with it.",
        "",
        "## Layer matching, early vs late",
        "",
        "![layer matching](layer_match.png)",
        "",
        "Which teacher target layer each student target layer was matched to, in the first and last third of the "
        "interaction stage.",
        "",
        "## One test example, layer by layer",
        "",
        *_example(example),
        "",
        "## Run",
        "",
        command_line("demo", out, s),
        f"- seeds: {r['seeds']}; wall time {r['seconds']:.0f} s; {peak_memory(r, 'data worker')}; {r['machine']}",
        "- timings depend on the machine's load: on a shared machine they vary by 2x.",
        "- `results.json` holds every number above; `runs/{sft,sft_teacher,kd,vlsi}/` the students, metrics and "
        "configs.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def pick_example(test: list[Item], evals: dict[str, dict]) -> int:
    """The first sequence question (the hardest task) the teacher answers right and SFT only wrong; else the first
    one the teacher answers right; else the first question."""
    right = {name: [is_correct(reply, item) for reply, item in zip(e["replies"], test)] for name, e in evals.items()}
    for wanted in (lambda k: right["teacher"][k] and not right["sft"][k], lambda k: right["teacher"][k]):
        for k, item in enumerate(test):
            if item.task == "sequence" and wanted(k):
                return k
    return 0


def explain_example(out: Path, test: list[Item], evals: dict[str, dict], max_new_tokens: int, models) -> dict | None:
    """One test item with every model's final answer and, teacher beside VLsI student, each target layer's answer
    (`max_new_tokens` of it: the task's answer length); `models`: the run's `models.ModelSet`."""
    import torch

    from ..explain import explain_pair, format_pair
    from ..models.loading import load_model, load_processor
    from ..models.verbalizer import Verbalizers

    k = pick_example(test, evals)
    item = test[k]
    image = out / "example.png"
    item.render().resize((448, 112)).save(image)
    example = {
        "item": item.to_dict(),
        "image": image.name,
        "replies": {name: e["replies"][k].strip() for name, e in evals.items()},
    }
    interacted = out / "runs" / "vlsi" / "stages" / "interact"
    processor = load_processor(str(models.teacher))
    rows = explain_pair(
        load_model(str(interacted / "student"), torch.float32),
        processor,
        Verbalizers.load(interacted / "verbalizers"),
        load_model(str(models.teacher), torch.float32),
        processor,
        Verbalizers.load(models.verbalizers),
        item.render(),
        item.question,
        max_new_tokens=max_new_tokens,
    )
    example["table"] = format_pair(rows)
    example["note"] = (
        "Each target layer's greedy answer through its verbalizer (`vlsi.explain`), student layers beside the teacher "
        "layers nearest in relative depth. The student is the VLsI student after the interaction stage, with the "
        "verbalizers trained alongside it (its final SFT stage changes the backbone, not the verbalizers)."
    )
    return example
