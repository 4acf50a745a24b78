"""Time and peak memory of one training step: SFT, final-layer KD and the VLsI interaction step
(docs/METHOD.md#memory-and-the-implementation).

Random-weight, text-only Qwen2 LLMs of real size (default: a Qwen2-VL-2B-sized student, a 7B-sized teacher,
7 target layers each; `--teacher-layers 80`: a 72B-deep teacher at 7B width, 19.7B parameters, 20 target layers),
batch 4 x 2048 tokens of which the last 256 per sample are the response. Each step runs through vlsi's own code:
  sft       vlsi.stages.sft.SFTStep: student forward/backward, cross-entropy on response tokens
  kd_final  vlsi.stages.interact.InteractStep with intermediate_loss=none: frozen teacher forward, student
            forward/backward, KL(teacher || student) of the final outputs on response tokens
  vlsi      vlsi.stages.interact.InteractStep as trained: capture hooks, the teacher's verbalized targets (once
            per step), Verbalizers, divergence_matrix scoring without autograd, layer_match (adaptive), the matched
            layers' KL (their scores, gradient recomputed chunk by chunk in backward) + the final-layer KL
  kd_final_cached, vlsi_cached (with --cache K): the same two steps trained from a teacher cache (vlsi.cache, top K
            per token and layer, 0: whole distributions), built once from the same batch: the teacher does not run
  kd_final_on_policy, vlsi_on_policy (with --on-policy): the same two steps on on-policy batches
            (interact.on_policy=1, vlsi.stages.onpolicy): the student samples each row's response to its prompt (the
            tokens before the response; batched, KV cache, temperature 1) as long as the fixed one (no end token can
            be drawn), then the step runs on it with reverse KL; `generate_ms` is the sampling's part of the step
A step is forward + backward (no optimizer update: that costs the same in all of them). The steps are timed in turns
(each round runs every step once), so a shared machine's changing load falls on all of them alike. Reported: median
wall time and median CPU time of this process over `--repeats` rounds after `--warmup` (device-synchronised; with one
thread the CPU time leaves out the time the process waited for a core), peak memory over the timed steps (all
weights included; on the CPU the process's peak RSS, Linux VmHWM reset before each timed step), and the FLOP floor:
the step's matmul FLOPs at the measured bf16 (CPU: fp32) matmul rate.

    python benchmarks/interaction_step.py --out benchmarks/results/interaction-h100.json          # one GPU
    python benchmarks/interaction_step.py --teacher-layers 80 --out benchmarks/results/deep80.json
    python benchmarks/interaction_step.py --tiny                                   # CPU smoke run, one thread, seconds
    python benchmarks/interaction_step.py --tiny --cache 64                        # + the steps from a teacher cache
    python benchmarks/interaction_step.py --cpu --cache 0 --repeats 3 --warmup 1   # CPU, arithmetic-bound: minutes
    python benchmarks/interaction_step.py --cpu --on-policy --steps kd_final vlsi    # + the on-policy steps
    python benchmarks/interaction_step.py --cpu --steps kd_final vlsi --repeats 1 --warmup 1 --profile  # operators
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlsi.cache import teacher_targets
from vlsi.config import TrainConfig
from vlsi.data import split_batch
from vlsi.models.family import default_target_layers, model_parts
from vlsi.models.loading import add_lora, freeze
from vlsi.models.verbalizer import Verbalizers
from vlsi.stages.interact import InteractStep, LiveTeacher, cached_targets
from vlsi.stages.onpolicy import OnPolicy
from vlsi.stages.sft import SFTStep

TOKENIZER_LEN = 151657  # Qwen2 tokenizer; both heads are padded past it (151936 and 152064 rows)
REAL = dict(
    student=dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    teacher=dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    batch=4,
    tokens=2048,
    response=256,
)
TINY = dict(
    student=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
    teacher=dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=544,
        tie_word_embeddings=False,
    ),
    batch=2,
    tokens=64,
    response=16,
)
# A CPU size where arithmetic dominates the step (`--cpu`): widths 512 / 1024, a 32k vocabulary, 512 tokens of which
# 128 are the response; the teacher 4x the student's decoder weights, as in the demo's pair.
CPU = dict(
    student=dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        tie_word_embeddings=True,
    ),
    teacher=dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32064,
        tie_word_embeddings=False,
    ),
    batch=1,
    tokens=512,
    response=128,
)
STEPS = ("sft", "kd_final", "vlsi")
CACHED = ("kd_final_cached", "vlsi_cached")
ON_POLICY = ("kd_final_on_policy", "vlsi_on_policy")


class TimedOnPolicy(OnPolicy):
    """`OnPolicy` that keeps the wall and CPU time of each rebuild (the sampling and the new batch), in ms."""

    def __init__(self, *args):
        super().__init__(*args)
        self.ms: list[float] = []
        self.cpu_ms: list[float] = []

    def __call__(self, student, batch, seed):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = super().__call__(student, batch, seed)
        self.ms.append(1000 * (time.perf_counter() - start))
        self.cpu_ms.append(1000 * (time.process_time() - cpu_start))
        return out


def build(config: dict, device: torch.device, dtype: torch.dtype) -> Qwen2ForCausalLM:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:  # initialise on the device: a 20B random init on the host takes minutes
        model = Qwen2ForCausalLM(Qwen2Config(**config, max_position_embeddings=4096, attn_implementation="sdpa"))
    torch.set_default_dtype(default)
    return model


def make_batch(size: dict, vocab: int, device: torch.device, generator: torch.Generator) -> dict:
    """Same tokens for both models (they share the tokenizer); the last `response` tokens of each row are labelled."""
    b, t, r = size["batch"], size["tokens"], size["response"]
    ids = torch.randint(0, vocab, (b, t), generator=generator).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, t - r :] = ids[:, t - r :]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {"student": inputs, "teacher": inputs, "model": inputs}


def body_params(model) -> int:
    """Parameters multiplied per token in the decoder blocks (embeddings are lookups; the head is counted apart)."""
    return sum(p.numel() for p in model_parts(model).layers.parameters())


def step_flops(args, size: dict, s_cfg: dict, t_cfg: dict, params: tuple[int, int], layers: tuple[int, int], v: int):
    """Matmul FLOPs each step cannot avoid (no recomputation; heads only on response positions).

    Forward 2 FLOPs per weight per token; backward 2 more for input gradients and, for trained weights, 2 for weight
    gradients. Causal attention: 2 * T * d per token and layer forward (scores and values, half the square).
    """
    (s_params, t_params), (t_s, t_l) = params, layers
    n = size["batch"] * size["tokens"]
    nr = size["batch"] * size["response"]  # v: the shared vocabulary every head is sliced to
    ds, dt = s_cfg["hidden_size"], t_cfg["hidden_size"]
    s_bwd = 2 if args.lora else 4  # LoRA: frozen base weights need input gradients only
    s_attn = 2 * size["tokens"] * ds * n * s_cfg["num_hidden_layers"]
    t_attn = 2 * size["tokens"] * dt * n * t_cfg["num_hidden_layers"]
    student = (2 + s_bwd) * s_params * n + 3 * s_attn + (2 + 2) * ds * v * nr  # frozen head: input gradients only
    teacher = 2 * t_params * n + t_attn + 2 * dt * v * nr
    s_verb = t_s * (6 * 3 * ds * ds + 4 * ds * v) * nr
    t_verb = t_l * 2 * (3 * dt * dt + dt * v) * nr
    return {
        "sft": student,
        "kd_final": student + teacher,
        "vlsi": student + teacher + s_verb + t_verb,
        "kd_final_cached": student,
        "vlsi_cached": student + s_verb,
        # + sampling, not counted: one forward per new token, memory-bound at batch 1
        "kd_final_on_policy": student + teacher,
        "vlsi_on_policy": student + teacher + s_verb + t_verb,
    }


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s (8192^2 on a GPU, 1024^2 on the CPU)."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * size**3 / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window: freed heap handed back to the system (glibc `malloc_trim`), then the kernel's
    high-water mark reset to the current RSS (`/proc/self/clear_refs` 5). False where that is not possible."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since `reset_peak_rss`) of this process, in GiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1]) / 2**20


def run_step(steps: dict, batches: dict, verbalizers, name: str) -> float:
    """One forward and backward of step `name`, gradients dropped; its loss. The student `verbalizers` train in the
    vlsi steps only (as `interact` freezes them without intermediate losses)."""
    verbalizers.requires_grad_(name.startswith("vlsi"))
    loss, _ = steps[name](batches[name])
    loss.backward()
    for p in steps[name].parameters():
        p.grad = None
    return loss.item()


def profile_steps(steps: dict, batches: dict, verbalizers, rows: int = 15) -> str:
    """torch.profiler's table of one more run of each step: its operators by their own CPU time, shapes apart."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for name in steps:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run_step(steps, batches, verbalizers, name)
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=50
        )
        tables.append(f"{name}\n{table}")
    return "\n".join(tables)


def measure(steps: dict, batches: dict, verbalizers, device: torch.device, repeats: int, warmup: int) -> dict:
    """Each step's times (wall and this process's CPU time) and peak memory, the steps timed in turns: round r runs
    every step once, so a change in the machine's load during the run falls on all of them alike."""

    def once(name: str) -> float:
        return run_step(steps, batches, verbalizers, name)

    results = {name: {"ms_all": [], "cpu_ms_all": [], "peak_gib": None} for name in steps}
    for round_number in range(warmup + repeats):
        for name, result in results.items():
            if result["peak_gib"] == "OOM":
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            rss = device.type == "cpu" and reset_peak_rss()
            before = rss_gib("VmRSS") if rss else None  # weights, inputs and what earlier steps left allocated
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                result["loss"] = once(name)
            except torch.OutOfMemoryError:
                result["peak_gib"] = "OOM"
                for p in steps[name].parameters():
                    p.grad = None
                torch.cuda.empty_cache()
                continue
            sync(device)
            if round_number < warmup:
                continue
            result["ms_all"].append(1000 * (time.perf_counter() - start))
            result["cpu_ms_all"].append(1000 * (time.process_time() - cpu_start))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
            elif rss:  # the process's peak RSS, and the step's own memory: that peak above what was resident before it
                peak = rss_gib("VmHWM")
                result["step_gib"] = max(result.get("step_gib", 0.0), peak - before)
            else:
                continue
            result["peak_gib"] = max(result["peak_gib"] or 0.0, peak)
    for result in results.values():
        timed = result["peak_gib"] != "OOM"
        result["ms"] = statistics.median(result["ms_all"]) if timed else None
        result["cpu_ms"] = statistics.median(result["cpu_ms_all"]) if timed else None
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU in fp32: a smoke run of seconds")
    parser.add_argument("--cpu", action="store_true", help="the CPU size where arithmetic dominates (minutes)")
    parser.add_argument("--teacher-layers", type=int, default=None, help="teacher depth (80: a 72B-deep teacher)")
    parser.add_argument("--lora", type=int, default=0, help="train the student through LoRA of this rank (0: full)")
    parser.add_argument("--chunk-size", type=int, default=TrainConfig.chunk_size, help="tokens per loss chunk")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument(
        "--cache",
        type=int,
        metavar="K",
        help="also time kd_final and vlsi from a teacher cache of the top K per token and layer (0: whole)",
    )
    parser.add_argument(
        "--on-policy", action="store_true", help="also time kd_final and vlsi on batches the student answers itself"
    )
    parser.add_argument(
        "--profile", action="store_true", help="then run each step once more under torch.profiler and print its table"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)

    size = TINY if args.tiny else CPU if args.cpu else REAL
    on_cpu = args.tiny or args.cpu or not torch.cuda.is_available()
    if args.tiny or args.cpu:
        torch.set_num_threads(1)  # tiny kernels gain nothing from threads; on a shared CPU threads make timings erratic
    device = torch.device("cpu" if on_cpu else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    s_cfg, t_cfg = dict(size["student"]), dict(size["teacher"])
    if args.teacher_layers:
        t_cfg["num_hidden_layers"] = args.teacher_layers
    vocab = min(TOKENIZER_LEN, s_cfg["vocab_size"], t_cfg["vocab_size"])
    torch.manual_seed(args.seed)

    teacher = freeze(build(t_cfg, device, dtype)).eval()
    student = build(s_cfg, device, dtype)
    t_params, s_params = body_params(teacher), body_params(student)
    t_parts, s_parts = model_parts(teacher), model_parts(student)
    if args.lora:
        freeze(student)
        student = add_lora(student, s_parts, args.lora, args.lora, 0.0, TrainConfig().interact.lora.target_modules)
    freeze(s_parts.norm), freeze(s_parts.lm_head)  # as the interaction stage freezes them (the verbalizers share them)
    t_layers = default_target_layers(t_parts.num_layers)  # every 4th block from 2 (docs/METHOD.md#target-layers)
    s_layers = default_target_layers(s_parts.num_layers)
    t_verb = freeze(Verbalizers(t_parts.hidden_size, t_layers)).to(device, dtype)
    s_verb = Verbalizers(s_parts.hidden_size, s_layers).to(device, dtype)

    cfg = TrainConfig(chunk_size=args.chunk_size)
    kd_cfg = TrainConfig(chunk_size=args.chunk_size)
    kd_cfg.interact.intermediate_loss = "none"
    generator = torch.Generator().manual_seed(args.seed)
    live = LiveTeacher(teacher, t_parts, t_verb, vocab)
    steps = {
        "sft": SFTStep(student, s_parts, vocab),
        "kd_final": InteractStep(student, s_parts, s_verb, live, kd_cfg, vocab, generator),
        "vlsi": InteractStep(student, s_parts, s_verb, live, cfg, vocab, generator),
    }
    steps = {name: steps[name] for name in args.steps}
    batch = make_batch(size, vocab, device, torch.Generator().manual_seed(args.seed))
    batches = dict.fromkeys(STEPS, batch)
    if args.cache is not None:  # built once, outside the timing: the teacher forward the cached steps no longer run
        inputs, mask, _ = split_batch(batch["teacher"])
        cached = teacher_targets(teacher, t_parts, t_verb, inputs, mask, vocab, args.cache, args.chunk_size)
        names = ("log_probs", "ids", "log_tail") if args.cache else ("log_probs",)
        cached_batch = {"student": batch["student"], "teacher": dict(zip(names, cached))}
        steps["kd_final_cached"] = InteractStep(student, s_parts, s_verb, cached_targets, kd_cfg, vocab, generator)
        steps["vlsi_cached"] = InteractStep(student, s_parts, s_verb, cached_targets, cfg, vocab, generator)
        batches |= dict.fromkeys(CACHED, cached_batch)
    samplers = {}
    if args.on_policy:  # every row answered by the student, the response as long as the fixed one
        for name, off_policy in zip(ON_POLICY, (kd_cfg, cfg), strict=True):
            step_cfg = copy.deepcopy(off_policy)
            stage = step_cfg.interact
            stage.on_policy, stage.sample.max_new_tokens = 1.0, size["response"]
            no_end = {s_cfg["vocab_size"]}  # past the head's rows: never sampled
            samplers[name] = TimedOnPolicy(stage, dict.fromkeys(batch, 0), no_end, torch.Generator(), 0)
            steps[name] = InteractStep(student, s_parts, s_verb, live, step_cfg, vocab, generator, None, samplers[name])
        batches |= dict.fromkeys(ON_POLICY, batch)
    rate = matmul_rate(device, dtype)
    flops = step_flops(args, size, s_cfg, t_cfg, (s_params, t_params), (len(s_layers), len(t_layers)), vocab)

    results = measure(steps, batches, s_verb, device, args.repeats, args.warmup)
    for name, sampler in samplers.items():  # the timed rounds' samplings
        result = results[name]
        result["generate_ms"] = statistics.median(sampler.ms[args.warmup :])
        result["generate_cpu_ms"] = statistics.median(sampler.cpu_ms[args.warmup :])
        result["generate_share"] = result["generate_ms"] / result["ms"]
        result["generate_cpu_share"] = result["generate_cpu_ms"] / result["cpu_ms"]
    for name, result in results.items():
        result["flops"] = flops[name]
        result["floor_ms"] = 1000 * flops[name] / rate
        result["floor_fraction"] = result["floor_ms"] / result["ms"] if result["ms"] else None
        print(f"{name}: {result['ms'] and round(result['ms'], 1)} ms", file=sys.stderr, flush=True)

    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} thread(s))",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_tflops": rate / 1e12,
        "batch": size["batch"],
        "tokens": size["tokens"],
        "response_tokens": size["response"],
        "student": {"layers": s_parts.num_layers, "hidden": s_parts.hidden_size, "target_layers": s_layers},
        "teacher": {"layers": t_parts.num_layers, "hidden": t_parts.hidden_size, "target_layers": t_layers},
        "student_params_B": sum(p.numel() for p in student.parameters()) / 1e9,
        "teacher_params_B": sum(p.numel() for p in teacher.parameters()) / 1e9,
        "lora": args.lora,
        "chunk_size": args.chunk_size,
        "cache_top_k": args.cache,
        "memory": "peak RSS (VmHWM; step_gib: above the RSS before the step)"
        if device.type == "cpu"
        else "torch.cuda.max_memory_allocated",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "steps": results,
    }
    for suffix in ("", "_cached"):
        kd, vl = results.get(f"kd_final{suffix}", {}), results.get(f"vlsi{suffix}", {})
        if kd.get("ms") and vl.get("ms"):
            report[f"vlsi_over_kd_time{suffix}"] = vl["ms"] / kd["ms"]
            report[f"vlsi_over_kd_cpu_time{suffix}"] = vl["cpu_ms"] / kd["cpu_ms"]
            for memory in ("peak_gib", "step_gib"):
                if isinstance(kd.get(memory), float) and isinstance(vl.get(memory), float):
                    name = "memory" if memory == "peak_gib" else "step_memory"
                    report[f"vlsi_over_kd_{name}{suffix}"] = vl[memory] / kd[memory]
    for name in ("kd_final", "vlsi"):
        live, cached = results.get(name, {}), results.get(f"{name}_cached", {})
        if live.get("ms") and cached.get("ms"):
            report[f"{name}_cached_over_live_time"] = cached["ms"] / live["ms"]
        on_policy = results.get(f"{name}_on_policy", {})
        if live.get("ms") and on_policy.get("ms"):
            report[f"{name}_on_policy_over_off_policy_time"] = on_policy["ms"] / live["ms"]
            report[f"{name}_on_policy_over_off_policy_cpu_time"] = on_policy["cpu_ms"] / live["cpu_ms"]
    print(table(report))
    if args.profile:
        print(profile_steps(steps, batches, s_verb))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def table(report: dict) -> str:
    rows = [
        f"{report['device']}, {report['dtype']}, batch {report['batch']} x {report['tokens']} tokens "
        f"({report['response_tokens']} response), student {_count(report['student_params_B'])} / teacher "
        f"{_count(report['teacher_params_B'])} parameters, {len(report['student']['target_layers'])} / "
        f"{len(report['teacher']['target_layers'])} target layers, matmul {report['matmul_tflops']:.2f} TFLOP/s",
        "| step | time (ms) | CPU time (ms) | floor (ms) | floor / time | peak memory (GiB) | step's own (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["steps"].items():
        ms = f"{r['ms']:.1f} | {r['cpu_ms']:.1f}" if r["ms"] else "out of memory | -"
        fraction = f"{r['floor_fraction']:.0%}" if r["floor_fraction"] else "-"
        peak = f"{r['peak_gib']:.3f}" if isinstance(r["peak_gib"], float) else (r["peak_gib"] or "n/a")
        own = f"{r['step_gib']:.3f}" if "step_gib" in r else "-"
        rows.append(f"| {name} | {ms} | {r['floor_ms']:.1f} | {fraction} | {peak} | {own} |")
    for key in [k for k in report if k.startswith("vlsi_over_kd_")]:
        goal = "<= 1.10x on a GPU, <= 1.30x at --cpu" if "time" in key else "<= 1.10x"
        rows.append(f"{key.replace('_', ' ')}: {report[key]:.2f}x (goal {goal})")
    for key in ("kd_final_cached_over_live_time", "vlsi_cached_over_live_time"):
        if key in report:
            rows.append(f"{key.replace('_', ' ')}: {report[key]:.2f}x (cache top-k {report['cache_top_k']})")
    for name in ON_POLICY:
        if name in report["steps"]:
            r, key = report["steps"][name], f"{name.removesuffix('_on_policy')}_on_policy_over_off_policy_time"
            ratio = f", {report[key]:.2f}x the off-policy step" if key in report else ""
            share = f"{r['generate_share']:.0%} of the step ({r['generate_cpu_share']:.0%} of its CPU time)"
            rows.append(f"{name}: sampling {r['generate_ms']:.1f} ms, {share}{ratio}")
    return "\n".join(rows)


def _count(billions: float) -> str:
    return f"{billions:.2f}B" if billions >= 0.1 else f"{billions * 1e3:.2f}M"


if __name__ == "__main__":
    sys.exit(main())
