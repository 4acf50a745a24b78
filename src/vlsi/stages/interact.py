"""Stage 2, interaction (docs/METHOD.md#stage-2-interaction): adaptive layer matching between student and teacher
verbalized layers.

Teacher entirely frozen. Student: LLM with LoRA (or fully trained), its verb-FFNs (frozen with
interact.freeze_student_verbalizers); final norm and LM head frozen (shared by every verbalizer head); vision tower
frozen by default. Teacher forcing on the training sample, response tokens only. Per batch:
  targets = the teacher's distribution at each target layer and at its output        -> t_l + 1 x [N, V]
  D[j, i] = KL(teacher layer j || student layer i), scored without autograd      -> [t_l, t_s]
  match   = layer_match(D)  (search range, order preservation, adaptive temperature); logged with how sharp
            each layer's draw was (normalised entropy, top probability)
  loss    = λ * sum_i KL(matched teacher layer || student layer i)  (the scores of D, their gradient recomputed
            chunk by chunk in backward; their mean with interact.intermediate_reduction=mean; λ =
            interact.intermediate_weight, 1 by default)
          + KL(teacher output || student output)
With interact.on_policy > 0 (GKD's λ), that share of the micro-batches is first answered by the student itself
(`vlsi.stages.onpolicy.OnPolicy`): the same terms are then taken on its sampled tokens, with
interact.on_policy_divergence (reverse KL by default) for every divergence of the batch.
The targets come from the live teacher (`LiveTeacher`, each computed once per step) or, with `teacher_cache=C`, from
the cache (`cached_targets`: the teacher is never loaded, top-k with the tail as one bucket,
docs/CACHE.md#the-estimator, and the same samples arrive in the same order); the step reads both alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
    TopK,
    chunked_cross_entropy,
    chunked_divergence,
    cross_entropy_from_logits,
    divergence,
    divergence_matrix,
    log_probs,
    row_chunks,
    shared_vocab_size,
)
from ..matching import layer_match, normalized_entropy
from ..models.family import Parts, capture, model_parts
from ..models.loading import (
    compute_dtype,
    freeze,
    load_processor,
)
from ..models.verbalizer import Verbalizers, final_head
from ..runfolder import append_jsonl, truncate_jsonl
from .checkpoint import saved_step
from .loop import MetricsLog, Run, checkpointing, make_accelerator, make_loader, tracking, train
from .onpolicy import OnPolicy, end_tokens, special_tokens
from .output import save_verbalizers, substate, write_output
from .samples import build_loader, load_samples
from .student import StudentRecipe, export_student, prepare_student


@dataclasses.dataclass
class TeacherTargets:
    """What the student learns from on one batch's N response tokens (`vlsi.losses.TopK`: whole log-probabilities
    [N, V] from a live teacher, whole or top-k from a cache): one target per teacher target layer, in layer order
    (none when the step matches no layers), and the teacher's own output."""

    layers: list[TopK]
    output: TopK


class LiveTeacher:
    """The frozen teacher run on the batch's teacher encoding. Each target layer's verbalized log-probabilities are
    computed once per step (t_l x [N, V] in fp32 held through the step) and read by the candidate scores and the
    matched terms alike; none when `layers` is false (final-layer KD, the CE ablation rows)."""

    def __init__(self, model, parts: Parts, verbalizers: Verbalizers, vocab: int):
        self.model, self.parts, self.verbalizers, self.vocab = model, parts, verbalizers, vocab

    @torch.no_grad()
    def __call__(self, batch: dict, layers: bool) -> TeacherTargets:
        inputs, mask, _ = split_batch(batch["teacher"])
        target_layers = self.verbalizers.target_layers if layers else []
        with capture(self.parts.layers, target_layers) as states:
            logits = self.model(**inputs, logits_to_keep=mask).logits[:, : self.vocab]  # [N, V]
        verbalized = []  # t_l x [N, V]
        for j, layer in enumerate(target_layers):
            head = self.verbalizers.head(j, self.parts.norm, self.parts.lm_head, self.vocab)
            verbalized.append(TopK(log_probs(head(states[layer][mask]))))
        return TeacherTargets(verbalized, TopK(log_probs(logits)))


def cached_targets(batch: dict, layers: bool) -> TeacherTargets:
    """The targets a teacher cache put in the batch (`vlsi.cache.CachedTeacher`), every layer's whatever `layers`."""
    *verbalized, output = cached_layers(batch["teacher"])  # t_l + 1 TopK [N, k], the last the teacher's output
    return TeacherTargets(verbalized, output)


Teacher = Callable[[dict, bool], TeacherTargets]  # (batch, whether layer targets are needed) -> the targets


class InteractStep(nn.Module):
    """Registered: the student (LoRA or full) and its verbalizers. The teacher is held outside: `teacher` gives a
    batch's targets (`LiveTeacher`, or `cached_targets` for a teacher cache). `on_policy` (interact.on_policy > 0)
    chooses the micro-batches the student answers itself, and rebuilds them."""

    def __init__(
        self,
        student,
        s_parts: Parts,
        s_verb: Verbalizers,
        teacher: Teacher,
        cfg: TrainConfig,
        vocab: int,
        generator: torch.Generator,
        chunks: ChunkPlan | None = None,
        on_policy: OnPolicy | None = None,
    ):
        super().__init__()
        if any(p.requires_grad for m in (s_parts.norm, s_parts.lm_head) for p in m.parameters()):
            raise ValueError(
                "the student's final norm and LM head must be frozen in the interaction stage: every verbalizer head "
                "shares them, and the matched divergences train what lies below them (vlsi.stages.student freezes them)"
            )
        self.student = student
        self.verbalizers = s_verb
        self._no_split_modules = getattr(student, "_no_split_modules", None)  # FSDP2 wraps these blocks
        self.s_parts = (s_parts,)
        self.teacher = teacher
        self.cfg = cfg.interact
        self.vocab = vocab
        self.generator = generator
        # response tokens -> the row ranges of the chunked losses (`distributed.chunk_plan`; alone: interact.chunk_size)
        self.chunks = chunks or (lambda n: row_chunks(n, cfg.chunk_size))
        self.on_policy = on_policy

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        (s_parts,), s_verb, cfg, vocab = self.s_parts, self.verbalizers, self.cfg, self.vocab
        seed = self.on_policy.draw() if self.on_policy is not None else None
        sampled = {}
        if seed is not None:  # the student's own responses replace the fixed ones, for both models
            batch, sampled = self.on_policy(self.student, batch, seed)
        divergence_kind = cfg.divergence if seed is None else cfg.on_policy_divergence
        beta = cfg.jsd_beta
        matched = cfg.intermediate_loss in ("kld", "l2")  # matched and trained on the same measure
        teacher = self.teacher(batch, matched)  # TeacherTargets: per teacher target layer if matched, and the output
        s_inputs, s_mask, targets = split_batch(batch["student"])
        with capture(s_parts.layers, s_verb.target_layers) as s_states:
            s_logits = self.student(**s_inputs, logits_to_keep=s_mask).logits[:, :vocab]  # [N, V]
        s_hidden = [s_states[layer][s_mask] for layer in s_verb.target_layers]  # t_s x [N, d_s]
        chunks = self.chunks(len(targets)) if cfg.intermediate_loss != "none" else None
        terms, logs = [], {}  # one term per student layer, added up by interact.intermediate_reduction
        if matched:
            kind = "l2" if cfg.intermediate_loss == "l2" else divergence_kind
            verbalized = [s_verb.verb_ffn(i, h) for i, h in enumerate(s_hidden)]  # t_s x [N, d_s], with grad
            read = final_head(s_parts.norm, s_parts.lm_head, vocab)  # frozen, every verbalizer's
            heads = [read] * len(verbalized)
            scores = divergence_matrix(verbalized, heads, teacher.layers, kind, chunks, beta)  # [t_l, t_s]
            # the interact.match section is layer_match's keyword arguments, one for one
            options = dataclasses.asdict(cfg.match)
            match, probabilities = layer_match(scores, **options, generator=self.generator, return_probabilities=True)
            for i, chosen in enumerate(match):  # a pair's loss is its score; backward recomputes its gradient
                pairs = [
                    chunked_divergence(verbalized[i], read, teacher.layers[j], kind, chunks, scores[j, i], beta)
                    for j in chosen
                ]
                terms.append(torch.stack(pairs).mean())
            logs = match_logs(s_verb.target_layers, kind, terms, match, probabilities)
        elif cfg.intermediate_loss == "ce":  # the CE ablation rows: ground truth at each student verbalizer
            terms, logs = ce_terms(s_hidden, s_verb, s_parts, vocab, targets, chunks)
        loss = s_logits.new_zeros((), dtype=torch.float32)
        for term in terms:  # one at a time, in layer order: a sum's rounding as the paper's plain loop gives it
            loss = loss + (term / len(terms) if cfg.intermediate_reduction == "mean" else term)
        loss = loss * cfg.intermediate_weight  # λ; x * 1.0 is x exactly: the default is the paper's sum bit for bit
        if cfg.last_loss == "kld":
            last = divergence(s_logits, teacher.output, divergence_kind, beta)
        elif cfg.last_loss == "ce":  # the ground truth instead of the teacher: an ablation row
            last = cross_entropy_from_logits(s_logits, targets)
        if cfg.last_loss != "none":
            logs["last"] = last.item()
            loss = loss + last
        if self.on_policy is not None:  # every process logs the same keys: the draws are shared
            logs[f"loss/{'off' if seed is None else 'on'}_policy"] = loss.item()
        return loss, logs | sampled


def match_logs(layers: list[int], kind: str, terms: list[torch.Tensor], match, probabilities) -> dict:
    """Per student target layer its matched term (`kl/layerN`, `l2/layerN`) and, for a sampled match, how sharp the
    draw was (p [candidates]: `match_entropy/layerN`, 1 = uniform, 0 = one-hot; `match_pmax/layerN`); the match."""
    logs: dict = {}
    for layer, term, p in zip(layers, terms, probabilities, strict=True):
        logs[f"{'l2' if kind == 'l2' else 'kl'}/layer{layer}"] = term.item()
        if p is not None:
            logs[f"match_entropy/layer{layer}"] = normalized_entropy(p).item()
            logs[f"match_pmax/layer{layer}"] = p.max().item()
    return logs | {"match": match}


def ce_terms(s_hidden, s_verb: Verbalizers, s_parts: Parts, vocab: int, targets, chunks) -> tuple[list, dict]:
    """Cross-entropy against the ground truth at every student verbalizer (`interact.intermediate_loss=ce`), no
    matching: one term per student target layer, and their logs `ce/layerN`."""
    terms = [
        chunked_cross_entropy(h, s_verb.head(i, s_parts.norm, s_parts.lm_head, vocab), targets, chunks)
        for i, h in enumerate(s_hidden)
    ]
    return terms, {f"ce/layer{layer}": term.item() for layer, term in zip(s_verb.target_layers, terms)}


def setup(cfg: TrainConfig, out: Path, samples=None, fingerprint: str | None = None) -> Run:
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

    cache = None
    if cfg.teacher_cache:  # the teacher's weights are never loaded: its targets come from the cache
        cache = TeacherCache(cfg.teacher_cache)
        cache.check(cache_identity(cfg, out / "verbalizers" / "teacher", t_proc, samples, fingerprint))
        t_rows = cache.vocab
    else:
        teacher = load_frozen(accelerator, cfg.teacher, dtype, cfg.trust_remote_code, cfg.teacher_quantization)
        t_parts = model_parts(teacher)
        t_verb = freeze(Verbalizers.load(out / "verbalizers" / "teacher"))
        t_rows = t_parts.vocab_rows
    s_verb = Verbalizers.load(out / "verbalizers" / "student")  # no more layers than the teacher's: pipeline checked
    torch.manual_seed(cfg.seed)
    student, s_parts = prepare_student(StudentRecipe.of(cfg.student, dtype, stage, cfg))
    if stage.intermediate_loss == "none" or stage.freeze_student_verbalizers:
        freeze(s_verb)  # saved with the stage's output as they were loaded
    vocab = shared_vocab_size(len(s_proc.tokenizer), s_parts.vocab_rows, t_rows)
    if cache is not None:
        cache.check_vocab(vocab)
        targets = cached_targets
    else:
        teacher, t_parts = prepare_frozen(accelerator, teacher, t_parts)
        targets = LiveTeacher(teacher, t_parts, t_verb.to(accelerator.device, dtype), vocab)
    generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)  # each process samples its own
    chunks = chunk_plan(accelerator, cfg.chunk_size)
    generators = {"match": generator}  # each process draws its own
    on_policy = None
    if stage.on_policy > 0:  # the same draws on every process: torch.Generator seeded alike
        pad_ids = {"student": s_proc.tokenizer.pad_token_id, "teacher": t_proc.tokenizer.pad_token_id}
        generators["on_policy"] = torch.Generator().manual_seed(cfg.seed)
        ends = end_tokens(student, s_proc.tokenizer)
        suppressed = special_tokens(s_proc.tokenizer, ends)
        on_policy = OnPolicy(stage, pad_ids, ends, generators["on_policy"], accelerator.process_index, suppressed)
    step = InteractStep(student, s_parts, s_verb, targets, cfg, vocab, generator, chunks, on_policy)
    processors = {"teacher": t_proc, "student": s_proc}
    loader = build_loader(cfg, samples, processors, stage.batch_size, cfg.seed, "interact")
    if cache is not None:  # the same samples in the same order, each with its cached targets as "teacher"
        dataset = CachedTeacher(loader.dataset, cache)
        loader = make_loader(dataset, stage.batch_size, make_collate(processors), cfg.seed, cfg.data.num_workers)
    return Run(accelerator, step, loader, dtype, s_proc, generators=generators)


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
        recipe = StudentRecipe.of(cfg.student, run.dtype, cfg.interact, cfg)
        export_student(run.accelerator, recipe, weights, run.processor, folder / "student")
        meta = dict(model=cfg.student, num_layers=s_parts.num_layers, vocab=step.vocab)
        save_verbalizers(step.verbalizers, state, folder / "verbalizers", **meta)

    return write_output(cfg, run, "interact", out / "stages" / "interact", write)


def interact(cfg: TrainConfig, out: Path, metrics: MetricsLog, samples=None, fingerprint: str | None = None) -> Path:
    """Stage 2: set up, train, save; writes OUT/stages/interact/{student,verbalizers} and OUT/layer_match.jsonl."""
    run = setup(cfg, out, samples, fingerprint)
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
