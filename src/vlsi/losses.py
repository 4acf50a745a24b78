"""Losses of VLsI: verbalizer cross-entropy and divergences between verbalized layers (docs/METHOD.md#stage-1-verbalize,
#stage-2-interaction, #memory-and-the-implementation).

Every distribution lives on the shared vocabulary: callers slice logits to `shared_vocab_size(...)` columns.
The maths runs in at least fp32 whatever the input dtype (bf16 in, fp32 out; fp64 stays fp64 for reference tests).
The chunked versions take hidden states and a *head* (`hidden [n, d] -> logits [n, V]`, in vlsi: verb-FFN -> frozen
final norm -> frozen LM head -> shared-vocab slice) so that [tokens x vocab] logits exist for one chunk at a time
and are recomputed during backward instead of being kept for it. `chunks` is the rows per chunk, or the row ranges
themselves, visited in order (a distributed launch may add empty ones: `vlsi.distributed.chunk_plan`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Head = Callable[[Tensor], Tensor]  # hidden [n, d] -> logits [n, V]
KINDS = ("forward", "reverse", "jsd", "l2")  # l2: a distance, not a divergence (the L2 ablation row, docs/METHOD.md)


def shared_vocab_size(tokenizer_len: int, *head_rows: int) -> int:
    """Number of leading vocabulary columns every compared distribution is sliced to (`logits[..., :size]`).

    LM heads are padded past the tokenizer and differently per model (Qwen2-VL-2B 151936 rows, 7B 152064,
    tokenizer 151657); padding rows are no real token, so distributions are compared over the smallest width.
    """
    return min((tokenizer_len, *head_rows))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


Chunks = int | Sequence[slice]  # rows per chunk, or the row ranges to visit in order


def row_chunks(n: int, size: int, at_least: int = 0) -> list[slice]:
    """Row ranges of `size` covering n rows, then empty ones up to `at_least` ranges in all."""
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    rows = [slice(start, min(start + size, n)) for start in range(0, n, size)]
    return rows + [slice(n, n)] * (at_least - len(rows))


def _chunks(n: int, chunks: Chunks) -> list[slice]:
    """`chunks` as row ranges over n rows, checked to cover them in order, each once."""
    if isinstance(chunks, int):
        return row_chunks(n, chunks)
    chunks = list(chunks)
    spans = [r.indices(n) for r in chunks]  # (start, stop, step), clipped to the n rows
    ends = [0] + [stop for _, stop, _ in spans]
    if any(step != 1 or start != end for (start, _, step), end in zip(spans, ends)) or ends[-1] != n:
        raise ValueError(f"the chunks {chunks} do not cover rows 0..{n} in order")
    return chunks


def _check_tokens(n: int) -> None:
    if n == 0:
        raise ValueError("no tokens to score; drop batches without response tokens before the loss")


def _checkpointed_sum(chunk_sum: Callable, rows: Sequence, fixed: tuple, chunks: Chunks) -> Tensor:
    """The sum over token chunks r of `chunk_sum(*(t[r] for t in rows), *fixed)`, each chunk checkpointed: only the
    row slices are kept for backward, and the chunk's [c, V] logits are recomputed then."""
    n = rows[0].shape[0]
    _check_tokens(n)
    return sum(
        checkpoint(chunk_sum, *(None if t is None else t[r] for t in rows), *fixed, use_reentrant=False)
        for r in _chunks(n, chunks)
    )


def _log_probs(logits: Tensor) -> Tensor:
    # [..., V] -> [..., V]; bf16 would lose the tail of a 150k-way softmax, so upcast to (at least) fp32 first
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities [..., V] of logits [..., V], in at least fp32: what every divergence here compares (and what
    a teacher cache stores, so that a cached teacher gives the live one's numbers)."""
    return _log_probs(logits)


def _divergence_from_log_probs(ls: Tensor, lt: Tensor, kind: str) -> Tensor:
    # student / teacher log-probs [..., V] -> per-token divergence [...]
    if kind == "forward":  # KL(teacher || student)
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse":  # KL(student || teacher)
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "l2":  # mean squared difference of log-probabilities: logit matching, each token's free shift removed
        return (ls - lt).square().mean(-1)
    # jsd: log m = log((p_s + p_t) / 2), a two-term logsumexp, so m never leaves log space
    lm = torch.logaddexp(ls, lt) - math.log(2.0)
    return 0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)


def kl_from_logits(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward") -> Tensor:
    """Per-token divergence [N] between logits [N, V]: forward KL(t||s), reverse KL(s||t), Jensen-Shannon, or "l2"
    (mean over the vocabulary of the squared difference of log-probabilities)."""
    _check_kind(kind)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "slice both to shared_vocab_size(...) columns"
        )
    return _divergence_from_log_probs(_log_probs(student_logits), _log_probs(teacher_logits), kind)


def divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward") -> Tensor:
    """Scalar divergence averaged over tokens (the response tokens: docs/METHOD.md#stage-2-interaction); logits
    [N, V]."""
    return kl_from_logits(student_logits, teacher_logits, kind).mean()


def cross_entropy_from_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of logits [N, V] against targets [N] in fp32; targets of -100 are ignored."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)


def _chunk_divergence_sum(
    student_hidden: Tensor, teacher_hidden: Tensor, student_head: Head, teacher_head: Head, kind: str
) -> Tensor:
    # [c, ds], [c, dt] -> scalar sum over the chunk. The teacher is recomputed here (also during backward) rather
    # than passed in as logits: a checkpoint keeps its tensor inputs alive, and [c, V] per chunk adds up to [N, V].
    with torch.no_grad():
        lt = _log_probs(teacher_head(teacher_hidden))  # [c, V]
    return _divergence_from_log_probs(_log_probs(student_head(student_hidden)), lt, kind).sum()


def chunked_divergence(
    student_hidden: Tensor,
    student_head: Head,
    teacher_hidden: Tensor,
    teacher_head: Head,
    kind: str = "forward",
    chunks: Chunks = 1024,
) -> Tensor:
    """`divergence(student_head(student_hidden), teacher_head(teacher_hidden), kind)` over token chunks.

    Hidden states [N, ds] and [N, dt]. Only hidden chunks are kept for backward; each chunk's logits are recomputed
    then (student with grad, teacher under no_grad: its head runs twice per chunk). Gradients reach `student_hidden`
    and the parameters of `student_head`, never the teacher.
    """
    _check_kind(kind)
    n = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"student has {n} tokens, teacher {teacher_hidden.shape[0]}; they must be the same tokens")
    rows, fixed = (student_hidden, teacher_hidden), (student_head, teacher_head, kind)
    return _checkpointed_sum(_chunk_divergence_sum, rows, fixed, chunks) / n


def _chunk_cross_entropy_sum(hidden: Tensor, targets: Tensor, head: Head) -> Tensor:
    # [c, d], [c] -> scalar sum over the chunk's non-ignored targets
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, head: Head, targets: Tensor, chunks: Chunks = 1024) -> Tensor:
    """`cross_entropy_from_logits(head(hidden), targets)` over token chunks, logits recomputed during backward.

    hidden [N, d], targets [N] (long, -100 ignored as in `F.cross_entropy`: the mean is over the other targets).
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {targets.shape[0]} targets")
    total = _checkpointed_sum(_chunk_cross_entropy_sum, (hidden, targets), (head,), chunks)
    return total / (targets != -100).sum()


@torch.no_grad()
def divergence_matrix(
    student_hiddens: Sequence[Tensor],
    student_heads: Sequence[Head],
    teacher_hiddens: Sequence[Tensor],
    teacher_heads: Sequence[Head],
    kind: str = "forward",
    chunks: Chunks = 1024,
) -> Tensor:
    """Token-averaged divergences D [t_l, t_s], D[j, i] = divergence(student layer i, teacher layer j), no autograd.

    Scores the matching candidates (docs/METHOD.md#memory-and-the-implementation): per token chunk, each student
    layer's log-probs are computed once and kept ([t_s, chunk, V]), each teacher layer's once and used against all of
    them; nothing outlives its chunk.
    """
    _check_kind(kind)
    if len(student_hiddens) != len(student_heads) or len(teacher_hiddens) != len(teacher_heads):
        raise ValueError("need one head per hidden-state tensor, for student and teacher")
    n = student_hiddens[0].shape[0]
    if any(h.shape[0] != n for h in [*student_hiddens, *teacher_hiddens]):
        raise ValueError("every student and teacher layer must hold the same tokens")
    _check_tokens(n)
    sums = 0
    for rows in _chunks(n, chunks):
        # t_s x [c, V]
        student_lp = [_log_probs(head(h[rows])) for h, head in zip(student_hiddens, student_heads, strict=True)]
        chunk_sums = []
        for h, head in zip(teacher_hiddens, teacher_heads, strict=True):
            lt = _log_probs(head(h[rows]))  # [c, V]
            chunk_sums.append(torch.stack([_divergence_from_log_probs(ls, lt, kind).sum() for ls in student_lp]))
        sums = sums + torch.stack(chunk_sums)  # [t_l, t_s]
    return sums / n


# --- a cached teacher (docs/CACHE.md): its k most likely tokens per position, the rest of its mass as one bucket ---

_EMPTY_BUCKET = -1e4  # log-mass of a tail bucket that holds nothing (k = V): exp() is 0, and it meets itself


class TopK(NamedTuple):
    """A teacher distribution as cached: the k largest log-probabilities [N, k], their token ids [N, k] (integer)
    and the log of the mass left outside them [N] (-inf where nothing is left). `ids` None: `log_probs` is the
    whole distribution [N, V] (`cache.top_k=0`) and `log_tail` is unused."""

    log_probs: Tensor
    ids: Tensor | None = None
    log_tail: Tensor | None = None

    def rows(self, r: slice) -> TopK:
        return TopK(*(None if t is None else t[r] for t in self))


def top_k(log_probs: Tensor, k: int) -> TopK:
    """Keep the k largest of log-probabilities [N, V] (k = 0: all of them, no ids); the tail is the log-sum-exp of
    the others, exactly -inf when k >= V (never 1 - sum, which rounds to a spurious positive mass)."""
    if k == 0:
        return TopK(log_probs)
    values, ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)  # [N, k], sorted
    return TopK(values, ids, log_probs.scatter(-1, ids, -math.inf).logsumexp(-1))


def topk_kl_from_logits(student_logits: Tensor, teacher: TopK, kind: str = "forward") -> Tensor:
    """Per-token divergence [N] between student logits [N, V] and a cached teacher.

    With a whole distribution (`teacher.ids` None) this is `kl_from_logits`. With a top-k one both distributions are
    coarsened to k + 1 buckets (the teacher's k tokens, and everything else as one bucket whose mass is the tail) and
    compared there: the estimator of docs/CACHE.md#the-estimator. Forward, reverse KL and JSD are f-divergences, so the
    coarsened value never exceeds the exact one; forward KL falls short by exactly
    tail_t * KL(teacher || student within the tail). It equals the exact divergence when k = V. "l2" needs the whole
    distribution.
    """
    _check_kind(kind)
    return _topk_divergence_from_log_probs(_log_probs(student_logits), teacher, kind)


def _topk_divergence_from_log_probs(ls: Tensor, teacher: TopK, kind: str) -> Tensor:
    # student log-probs [N, V], cached teacher -> per-token divergence [N]
    lt = teacher.log_probs.to(ls.dtype)
    if teacher.ids is None:
        if lt.shape != ls.shape:
            raise ValueError(f"cached teacher log-probs {tuple(lt.shape)} and student logits {tuple(ls.shape)} differ")
        return _divergence_from_log_probs(ls, lt, kind)
    if kind == "l2":
        raise ValueError("the l2 distance needs the whole teacher distribution: a cache with cache.top_k=0")
    ids = teacher.ids.long()
    has_tail = teacher.log_tail > -math.inf  # [N]; False where the k tokens hold all the mass
    outside = torch.where(has_tail[:, None], ls.scatter(-1, ids, -math.inf), 0.0)  # 0: keeps logsumexp's grad finite
    ls_tail = torch.where(has_tail, outside.logsumexp(-1), _EMPTY_BUCKET)  # [N] student mass off the teacher's top-k
    lt_tail = torch.where(has_tail, teacher.log_tail.to(ls.dtype), _EMPTY_BUCKET)
    ls_c = torch.cat([ls.gather(-1, ids), ls_tail[:, None]], -1)  # [N, k + 1]
    lt_c = torch.cat([lt, lt_tail[:, None]], -1)
    return _divergence_from_log_probs(ls_c, lt_c, kind)


def topk_divergence(student_logits: Tensor, teacher: TopK, kind: str = "forward") -> Tensor:
    """`topk_kl_from_logits` averaged over tokens: the last-layer term against a cached teacher output."""
    return topk_kl_from_logits(student_logits, teacher, kind).mean()


def _chunk_topk_divergence_sum(student_hidden: Tensor, log_probs, ids, log_tail, student_head: Head, kind: str):
    return topk_kl_from_logits(student_head(student_hidden), TopK(log_probs, ids, log_tail), kind).sum()


def _check_cached_rows(n: int, teachers: Sequence[TopK]) -> None:
    if any(t.log_probs.shape[0] != n for t in teachers):
        raise ValueError(f"the student has {n} response tokens but the cached teacher rows differ; same tokens needed")


def chunked_topk_divergence(
    student_hidden: Tensor,
    student_head: Head,
    teacher: TopK,
    kind: str = "forward",
    chunks: Chunks = 1024,
) -> Tensor:
    """`chunked_divergence` against a cached teacher: `topk_divergence(student_head(student_hidden), teacher, kind)`
    over token chunks, each chunk's student logits recomputed during backward. student_hidden [N, d]."""
    _check_kind(kind)
    n = student_hidden.shape[0]
    _check_cached_rows(n, [teacher])
    rows = (student_hidden, *teacher)
    return _checkpointed_sum(_chunk_topk_divergence_sum, rows, (student_head, kind), chunks) / n


@torch.no_grad()
def topk_divergence_matrix(
    student_hiddens: Sequence[Tensor],
    student_heads: Sequence[Head],
    teachers: Sequence[TopK],
    kind: str = "forward",
    chunks: Chunks = 1024,
) -> Tensor:
    """`divergence_matrix` against cached teacher layers: D [t_l, t_s], D[j, i] = token-averaged
    topk divergence(student layer i || cached teacher layer j), no autograd, chunked over tokens."""
    _check_kind(kind)
    if len(student_hiddens) != len(student_heads):
        raise ValueError("need one head per student hidden-state tensor")
    n = student_hiddens[0].shape[0]
    if any(h.shape[0] != n for h in student_hiddens):
        raise ValueError("every student layer must hold the same tokens")
    _check_cached_rows(n, teachers)
    _check_tokens(n)
    sums = 0
    for rows in _chunks(n, chunks):
        # t_s x [c, V], computed once and held against every cached teacher layer
        student_lp = [_log_probs(head(h[rows])) for h, head in zip(student_hiddens, student_heads, strict=True)]
        chunk_sums = [
            torch.stack([_topk_divergence_from_log_probs(ls, t.rows(rows), kind).sum() for ls in student_lp])
            for t in teachers
        ]
        sums = sums + torch.stack(chunk_sums)  # [t_l, t_s]
    return sums / n
