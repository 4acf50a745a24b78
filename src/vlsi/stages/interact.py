"""Stage 2, interaction (docs/METHOD.md#stage-2-interaction): adaptive layer matching between student and teacher
verbalized layers.

Teacher entirely frozen. Student: LLM with LoRA (or fully trained), its verb-FFNs; final norm and LM head
frozen (shared by every verbalizer head); vision tower frozen by default. Teacher forcing on the training sample,
response tokens only. Per batch:
  D[j, i] = KL(teacher layer j || student layer i), scored without autograd      -> [t_l, t_s]
  match   = layer_match(D)  (search range, order preservation, adaptive temperature); logged with how sharp
            each layer's draw was (normalised entropy, top probability)
  loss    = sum_i KL(matched teacher layer || student layer i)  (recomputed with gradient, chunked; their mean
            with interact.intermediate_reduction=mean)
          + KL(teacher output || student output)
With `teacher_cache=C` the teacher is never loaded: every teacher distribution comes from the cache (`vlsi.cache`),
top-k with the tail as one bucket (docs/CACHE.md#the-estimator), and the same samples arrive in the same order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ..cache import CachedTeacher, TeacherCache, cache_identity, cached_layers
from ..config import TrainConfig
from ..data import make_collate, split_batch
from ..distributed import ChunkPlan, chunk_plan, load_frozen, prepare_frozen
from ..losses import (
    chunked_cross_entropy,
    chunked_divergence,
    chunked_topk_divergence,
    cross_entropy_from_logits,
    divergence,
    divergence_matrix,
    row_chunks,
    shared_vocab_size,
    topk_divergence,
    topk_divergence_matrix,
)
from ..matching import layer_match, normalized_entropy
from ..models.family import Parts, capture, model_parts
from ..models.loading import (
    compute_dtype,
    freeze,
    load_processor,
)
from ..models.student import export_student, prepare_student
from ..models.verbalizer import Verbalizers
from ..runfolder import append_jsonl, truncate_jsonl
from .checkpoint import saved_step
from .common import (
    Run,
    build_loader,
    checkpointing,
    load_samples,
    save_verbalizers,
    substate,
    tracking,
    write_output,
)
from .loop import MetricsLog, make_accelerator, make_loader, train


class InteractStep(nn.Module):
    """Registered: the student (LoRA or full) and its verbalizers. The teacher is held outside; teacher None (with
    t_parts and t_verb None): a cached teacher, whose targets arrive in `batch["teacher"]` (`vlsi.cache`)."""

    def __init__(
        self,
        student,
        s_parts: Parts,
        s_verb: Verbalizers,
        teacher,
        t_parts: Parts,
        t_verb: Verbalizers,
        cfg: TrainConfig,
        vocab: int,
        generator: torch.Generator,
        chunks: ChunkPlan | None = None,
    ):
        super().__init__()
        self.student = student
        self.verbalizers = s_verb
        self._no_split_modules = getattr(student, "_no_split_modules", None)  # FSDP2 wraps these blocks
        self.s_parts = (s_parts,)
        self.frozen_teacher = (teacher, t_parts, t_verb)
        self.cfg = cfg.interact
        self.vocab = vocab
        self.generator = generator
        # response tokens -> the row ranges of the chunked losses (`distributed.chunk_plan`; alone: interact.chunk_size)
        self.chunks = chunks or (lambda n: row_chunks(n, cfg.chunk_size))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        teacher, t_parts, t_verb = self.frozen_teacher
        (s_parts,) = self.s_parts
        s_verb, cfg, vocab = self.verbalizers, self.cfg, self.vocab
        s_inputs, s_mask, targets = split_batch(batch["student"])
        if teacher is None:  # cached: t_l + 1 TopK [N, k], the last one the teacher's output
            *t_cached, t_out = cached_layers(batch["teacher"])
        else:
            t_inputs, t_mask, _ = split_batch(batch["teacher"])
            with torch.no_grad(), capture(t_parts.layers, t_verb.target_layers) as t_states:
                t_logits = teacher(**t_inputs, logits_to_keep=t_mask).logits[:, :vocab]  # [N, V]
            t_hidden = [t_states[layer][t_mask] for layer in t_verb.target_layers]  # t_l x [N, d_t]
            t_heads = [t_verb.head(j, t_parts.norm, t_parts.lm_head, vocab) for j in range(len(t_verb))]
        with capture(s_parts.layers, s_verb.target_layers) as s_states:
            s_logits = self.student(**s_inputs, logits_to_keep=s_mask).logits[:, :vocab]  # [N, V]
        s_hidden = [s_states[layer][s_mask] for layer in s_verb.target_layers]  # t_s x [N, d_s]
        s_heads = [s_verb.head(i, s_parts.norm, s_parts.lm_head, vocab) for i in range(len(s_verb))]

        logs: dict = {}
        loss = s_logits.new_zeros((), dtype=torch.float32)
        chunk = self.chunks(len(targets)) if cfg.intermediate_loss != "none" else None
        layer_terms: list[torch.Tensor] = []  # one per student layer, added up by interact.intermediate_reduction
        if cfg.intermediate_loss in ("kld", "l2"):
            # matched and trained on the same measure: the divergence, or the L2 distance of log-probabilities
            kind = "l2" if cfg.intermediate_loss == "l2" else cfg.divergence
            if teacher is None:
                scores = topk_divergence_matrix(s_hidden, s_heads, t_cached, kind, chunk)  # [t_l, t_s]
            else:
                scores = divergence_matrix(s_hidden, s_heads, t_hidden, t_heads, kind, chunk)

            def matched(i: int, j: int) -> torch.Tensor:  # student layer i against teacher layer j, with gradient
                if teacher is None:
                    return chunked_topk_divergence(s_hidden[i], s_heads[i], t_cached[j], kind, chunk)
                return chunked_divergence(s_hidden[i], s_heads[i], t_hidden[j], t_heads[j], kind, chunk)

            # the interact.match section is layer_match's keyword arguments, one for one
            options = dataclasses.asdict(cfg.match)
            match, probabilities = layer_match(scores, **options, generator=self.generator, return_probabilities=True)
            for i, (chosen, p) in enumerate(zip(match, probabilities)):
                layer = s_verb.target_layers[i]
                layer_loss = torch.stack([matched(i, j) for j in chosen]).mean()
                logs[f"{'l2' if kind == 'l2' else 'kl'}/layer{layer}"] = layer_loss.item()
                layer_terms.append(layer_loss)
                if p is not None:  # a sampled match: how sharp its draw was (p [candidates])
                    logs[f"match_entropy/layer{layer}"] = normalized_entropy(p).item()  # 1 = uniform, 0 = one-hot
                    logs[f"match_pmax/layer{layer}"] = p.max().item()
            logs["match"] = match
        elif cfg.intermediate_loss == "ce":
            for i, layer in enumerate(s_verb.target_layers):
                layer_loss = chunked_cross_entropy(s_hidden[i], s_heads[i], targets, chunk)
                logs[f"ce/layer{layer}"] = layer_loss.item()
                layer_terms.append(layer_loss)
        mean = cfg.intermediate_reduction == "mean"
        for term in layer_terms:  # one at a time, in layer order: a sum's rounding as the paper's plain loop gives it
            loss = loss + (term / len(layer_terms) if mean else term)
        if cfg.last_loss == "kld" and teacher is None:
            last = topk_divergence(s_logits, t_out, cfg.divergence)
        elif cfg.last_loss == "kld":
            last = divergence(s_logits, t_logits, cfg.divergence)
        elif cfg.last_loss == "ce":
            last = cross_entropy_from_logits(s_logits, targets)
        else:
            last = None
        if last is not None:
            logs["last"] = last.item()
            loss = loss + last
        return loss, logs


def setup(cfg: TrainConfig, out: Path, samples=None) -> Run:
    """The teacher (frozen, placed as the launch distributes training) or its cache, the student and both models'
    verbalizers from OUT/verbalizers, the step module and the data loader."""
    stage = cfg.interact
    dtype = compute_dtype(cfg.precision)
    # Without the last-layer loss the student blocks above its last target layer get no gradient.
    accelerator = make_accelerator(stage, dtype, find_unused_parameters=stage.last_loss == "none", **tracking(cfg))
    t_proc, s_proc = (
        load_processor(cfg.teacher, cfg.trust_remote_code),
        load_processor(cfg.student, cfg.trust_remote_code),
    )
    samples = samples if samples is not None else load_samples(cfg)

    cache = teacher = t_parts = t_verb = None
    if cfg.teacher_cache:  # the teacher's weights are never loaded: its targets come from the cache
        cache = TeacherCache(cfg.teacher_cache)
        cache.check(cache_identity(cfg, out / "verbalizers" / "teacher", t_proc, samples))
        t_rows = cache.vocab
    else:
        teacher = load_frozen(accelerator, cfg.teacher, dtype, cfg.trust_remote_code, cfg.teacher_quantization)
        t_parts = model_parts(teacher)
        t_verb = freeze(Verbalizers.load(out / "verbalizers" / "teacher"))
        t_rows = t_parts.vocab_rows
    s_verb = Verbalizers.load(out / "verbalizers" / "student")  # no more layers than the teacher's: pipeline checked
    torch.manual_seed(cfg.seed)
    student, s_parts = prepare_student(cfg.student, dtype, stage, cfg)
    if stage.intermediate_loss == "none":
        freeze(s_verb)
    vocab = shared_vocab_size(len(s_proc.tokenizer), s_parts.vocab_rows, t_rows)
    if cache is not None:
        cache.check_vocab(vocab)
    else:
        teacher, t_parts = prepare_frozen(accelerator, teacher, t_parts)
        t_verb.to(accelerator.device, dtype)
    generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)  # each process samples its own
    chunks = chunk_plan(accelerator, cfg.chunk_size)
    step = InteractStep(student, s_parts, s_verb, teacher, t_parts, t_verb, cfg, vocab, generator, chunks)
    processors = {"teacher": t_proc, "student": s_proc}
    loader = build_loader(cfg, samples, processors, stage.batch_size, cfg.seed, "interact")
    if cache is not None:  # the same samples in the same order, each with its cached targets as "teacher"
        dataset = CachedTeacher(loader.dataset, cache)
        loader = make_loader(dataset, stage.batch_size, make_collate(processors), cfg.seed, cfg.data.num_workers)
    return Run(accelerator, step, loader, dtype, s_proc, generators={"match": generator})  # each process draws its own


def match_recorder(cfg: TrainConfig, out: Path, accelerator: Accelerator):
    """-> `on_micro_step` for `train`: appends each micro-step's matches (every process's, in process order) to
    OUT/layer_match.jsonl, after dropping those past the checkpoint a resumed run continues from."""
    match_log = out / "layer_match.jsonl"
    if accelerator.is_main_process:
        resumed = saved_step(checkpointing(cfg, "interact")["checkpoint_dir"])
        truncate_jsonl(match_log, lambda row: row["step"] <= resumed)

    def record(step_number: int, match: list[list[int]]) -> None:
        matches = gather_object([match])
        if accelerator.is_main_process:
            append_jsonl(
                match_log, [{"step": step_number, "match": [i[0] if len(i) == 1 else i for i in m]} for m in matches]
            )

    return record


def save(cfg: TrainConfig, out: Path, run: Run, state: dict | None) -> Path:
    """OUT/stages/interact/{student (merged, a plain checkpoint), verbalizers}."""
    step, (s_parts,) = run.step, run.step.s_parts

    def write(folder: Path) -> None:
        weights = substate(state, "student")
        export_student(
            run.accelerator, weights, cfg.student, run.dtype, cfg.interact, cfg, run.processor, folder / "student"
        )
        meta = dict(model=cfg.student, num_layers=s_parts.num_layers, vocab=step.vocab)
        save_verbalizers(step.verbalizers, state, folder / "verbalizers", **meta)

    return write_output(cfg, run, "interact", out / "stages" / "interact", write)


def interact(cfg: TrainConfig, out: Path, metrics: MetricsLog, samples=None) -> Path:
    """Stage 2: set up, train, save; writes OUT/stages/interact/{student,verbalizers} and OUT/layer_match.jsonl."""
    run = setup(cfg, out, samples)
    state = train(
        run.accelerator,
        run.step,
        run.loader,
        cfg.interact,
        "interact",
        metrics,
        on_micro_step=match_recorder(cfg, out, run.accelerator),
        generators=run.generators,
        **checkpointing(cfg, "interact"),
    )
    return save(cfg, out, run, state)
