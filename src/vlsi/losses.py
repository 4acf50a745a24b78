"""Losses of VLsI: verbalizer cross-entropy and divergences between verbalized layers (docs/METHOD.md#stage-1-verbalize,
#stage-2-interaction, #memory-and-the-implementation).

Every distribution lives on the shared vocabulary: callers slice logits to `shared_vocab_size(...)` columns.
The maths runs in at least fp32 whatever the input dtype (bf16 in, fp32 out; fp64 stays fp64 for reference tests).
A student is compared with a *teacher target* (`TopK`): one teacher distribution per token, whole (the live teacher,
a cache with `cache.top_k=0`) or its top k with the rest as one bucket (a teacher cache); every divergence takes
either. The chunked versions take hidden states and a *head* (`hidden [n, d] -> logits [n, V]`) so that
[tokens x vocab] logits exist for one chunk at a time and are recomputed during backward instead of being kept for
it. `chunks` is the rows per chunk, or the row ranges themselves, visited in order (a distributed launch may add
empty ones: `vlsi.distributed.chunk_plan`).
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
    return sum(checkpoint(chunk_sum, *(t[r] for t in rows), *fixed, use_reentrant=False) for r in _chunks(n, chunks))


def _upcast(logits: Tensor) -> Tensor:
    # bf16 would lose the tail of a 150k-way softmax: every distribution is taken in (at least) fp32
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _log_probs(logits: Tensor) -> Tensor:
    # [..., V] -> [..., V], in at least fp32
    return torch.log_softmax(_upcast(logits), dim=-1)


def log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities [..., V] of logits [..., V], in at least fp32: what every divergence here compares (and what
    a teacher cache stores, so that a cached teacher gives the live one's numbers)."""
    return _log_probs(logits)


# --- a teacher target: what a student distribution is compared with, for one teacher layer or output ---

_EMPTY_BUCKET = -1e4  # log-mass of a tail bucket that holds nothing (k = V): exp() is 0, and it meets itself


class TopK(NamedTuple):
    """A teacher target over N tokens. `ids` None: `log_probs` [N, V] is the whole distribution (the live teacher,
    `TopK(log_probs(logits))`, or a cache with `cache.top_k=0`) and `log_tail` is unused. Otherwise, as a teacher
    cache keeps it (docs/CACHE.md): the k largest log-probabilities [N, k], their token ids [N, k] (integer) and the
    log of the mass left outside them [N] (-inf where nothing is left)."""

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


def _check_target(teacher: TopK, kind: str, n: int) -> None:
    _check_kind(kind)
    if teacher.log_probs.shape[0] != n:
        raise ValueError(
            f"the student has {n} tokens but the teacher target {teacher.log_probs.shape[0]}; they must be the same "
            "tokens"
        )
    if kind == "l2" and teacher.ids is not None:
        raise ValueError("the l2 distance needs the whole teacher distribution: a cache with cache.top_k=0")


def _check_columns(student: Tensor, teacher: Tensor) -> None:
    if teacher.shape != student.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher log-probabilities {tuple(teacher.shape)} differ; slice "
            "both to shared_vocab_size(...) columns"
        )


def _divergence_from_log_probs(ls: Tensor, lt: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    # student / teacher log-probs [..., V] -> per-token divergence [...]; beta: jsd's weight of the teacher
    if kind == "forward":  # KL(teacher || student)
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse":  # KL(student || teacher)
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "l2":  # mean squared difference of log-probabilities: logit matching, each token's free shift removed
        return (ls - lt).square().mean(-1)
    # jsd (GKD's generalised JSD): m = beta p_t + (1 - beta) p_s as a two-term logsumexp, so m never leaves log
    # space; beta 1/2 keeps the symmetric JSD's own arithmetic, bit for bit
    if beta == 0.5:
        lm = torch.logaddexp(ls, lt) - math.log(2.0)
    else:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _target_divergence(ls: Tensor, teacher: TopK, kind: str, beta: float = 0.5) -> Tensor:
    # student log-probs [N, V], teacher target -> per-token divergence [N]
    lt = teacher.log_probs.to(ls.dtype)
    if teacher.ids is None:
        _check_columns(ls, lt)
        return _divergence_from_log_probs(ls, lt, kind, beta)
    # top k: both distributions coarsened to the teacher's k tokens and one bucket for everything else
    ids = teacher.ids.long()
    has_tail = teacher.log_tail > -math.inf  # [N]; False where the k tokens hold all the mass
    outside = torch.where(has_tail[:, None], ls.scatter(-1, ids, -math.inf), 0.0)  # 0: keeps logsumexp's grad finite
    ls_tail = torch.where(has_tail, outside.logsumexp(-1), _EMPTY_BUCKET)  # [N] student mass off the teacher's top-k
    lt_tail = torch.where(has_tail, teacher.log_tail.to(ls.dtype), _EMPTY_BUCKET)
    ls_c = torch.cat([ls.gather(-1, ids), ls_tail[:, None]], -1)  # [N, k + 1]
    lt_c = torch.cat([lt, lt_tail[:, None]], -1)
    return _divergence_from_log_probs(ls_c, lt_c, kind, beta)


def token_divergence(student_logits: Tensor, teacher: TopK, kind: str = "forward", beta: float = 0.5) -> Tensor:
    """Per-token divergence [N] of student logits [N, V] from a teacher target: forward KL(t||s), reverse KL(s||t),
    Jensen-Shannon (GKD's generalised one with `beta`: beta KL(t||m) + (1 - beta) KL(s||m), m = beta p_t +
    (1 - beta) p_s; 0.5 the symmetric JSD), or "l2" (mean over the vocabulary of the squared difference of
    log-probabilities).

    Against a whole distribution this is the exact divergence. Against a top-k target both distributions are
    coarsened to k + 1 buckets (the teacher's k tokens, and everything else as one bucket whose mass is the tail) and
    compared there: the estimator of docs/CACHE.md#the-estimator. Forward, reverse KL and JSD are f-divergences, so
    the coarsened value never exceeds the exact one; forward KL falls short by exactly
    tail_t * KL(teacher || student within the tail). It equals the exact divergence when k = V. "l2" needs the whole
    distribution.
    """
    _check_target(teacher, kind, student_logits.shape[0])
    return _target_divergence(_log_probs(student_logits), teacher, kind, beta)


def divergence(student_logits: Tensor, teacher: TopK, kind: str = "forward", beta: float = 0.5) -> Tensor:
    """`token_divergence` averaged over tokens (the response tokens: docs/METHOD.md#stage-2-interaction): the
    last-layer term."""
    return token_divergence(student_logits, teacher, kind, beta).mean()


def cross_entropy_from_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of logits [N, V] against targets [N] in fp32; targets of -100 are ignored."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)


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


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    # [c, V] . [c, V] -> [c], row by row ([c, 1, V] @ [c, V, 1]): one read of each, nothing [c, V] allocated
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def _whole_forward(teachers: Sequence[TopK], kind: str) -> bool:
    # forward KL against whole distributions: the pairs' sums need no student log-probabilities (`_forward_kl_sums`)
    return kind == "forward" and all(t.ids is None for t in teachers)


def _forward_kl_sums(logits: Sequence[Tensor], teachers: Sequence[TopK]) -> Tensor:
    """Token sums [t_l, t_s] of KL(teacher j || student i) over a chunk's rows, student logits t_s x [c, V] (fp32 or
    wider; overwritten), whole teacher targets t_l x [c, V]. Per token, with ls = x - lse(x):
    sum_v p_t (lt - ls) = p_t . lt - p_t . x + lse(x) * sum_v p_t, so each pair costs one row dot product, each
    student layer one logsumexp and each teacher layer one exp, into one buffer: the passes over [c, V] drop from four
    per pair, each into a new tensor, to about one per layer
    (docs/PERFORMANCE.md#fewer-passes-over-the-vocabulary-2026-12-07)."""
    p_t = torch.empty_like(logits[0])  # each teacher layer's probabilities in turn
    sums, masses = [], []
    for teacher in teachers:
        lt = teacher.log_probs.to(p_t.dtype)
        _check_columns(p_t, lt)
        torch.exp(lt, out=p_t)
        own = _row_dot(p_t, lt)  # [c]: sum_v p_t lt
        sums.append(torch.stack([own - _row_dot(p_t, x) for x in logits]))  # [t_s, c]
        masses.append(p_t.sum(-1))  # [c]: sum_v p_t, 1 up to rounding
    lse = torch.stack([_logsumexp_(x) for x in logits])  # [t_s, c], the logits no longer needed
    return torch.stack([(pair + lse * mass).sum(-1) for pair, mass in zip(sums, masses)])


def _logsumexp_(x: Tensor) -> Tensor:
    # [c, V] -> [c], as torch.logsumexp (the row's maximum taken out first) but in x's own memory, overwritten
    top = x.amax(-1, keepdim=True)
    return x.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


def _divergence_sums(logits: Sequence[Tensor], teachers: Sequence[TopK], kind: str, beta: float) -> Tensor:
    """Token sums [t_l, t_s] over one chunk of the divergence of every student layer's logits t_s x [c, V] (fresh
    from the heads: fp32 ones are overwritten) from every teacher target (their rows of the chunk): the one arithmetic
    of the scores and of the divergences' own values."""
    logits = [_upcast(x) for x in logits]
    if _whole_forward(teachers, kind):
        return _forward_kl_sums(logits, teachers)
    student_lp = [torch.log_softmax(x, dim=-1) for x in logits]  # t_s x [c, V], each held against every target
    return torch.stack(
        [torch.stack([_target_divergence(ls, t, kind, beta).sum() for ls in student_lp]) for t in teachers]
    )


def _logit_gradient(logits: Tensor, teacher: TopK, kind: str, beta: float, scale: Tensor) -> Tensor:
    """scale * d/dlogits of the chunk's divergence sum, for student logits [c, V]. Forward KL against a whole target
    is written out, softmax(x) * sum_v p_t - p_t per token (a few passes over [c, V], where autograd through the
    log-softmax and the divergence takes a dozen); other divergences and top-k targets go through autograd from the
    logits."""
    if _whole_forward([teacher], kind):
        x, lt = _upcast(logits), teacher.log_probs
        _check_columns(x, lt)
        p_t = lt.to(x.dtype).exp()
        return torch.softmax(x, dim=-1).mul_(p_t.sum(-1, keepdim=True)).sub_(p_t).mul_(scale).to(logits.dtype)
    with torch.enable_grad():
        x = logits.detach().requires_grad_()
        total = _target_divergence(_log_probs(x), teacher, kind, beta).sum()
        return torch.autograd.grad(total, x, scale)[0]


class _FrozenHeadDivergence(torch.autograd.Function):
    """sum_r divergence(head(hidden[r]) || teacher rows r) / N, computed without autograd unless `value` already holds
    it; backward runs the head again, chunk by chunk, and returns the gradient to `hidden` alone: nothing [c, V] is
    kept for backward, and the head's own weights get no gradient (it must be frozen)."""

    @staticmethod
    def forward(ctx, hidden, value, head, kind, beta, chunks, *teacher):
        ctx.save_for_backward(hidden, *teacher)
        ctx.head, ctx.kind, ctx.beta, ctx.chunks = head, kind, beta, chunks
        if value is None:
            value = sum(_divergence_sums([head(hidden[r])], [TopK(*teacher).rows(r)], kind, beta)[0, 0] for r in chunks)
            return value / hidden.shape[0]
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        hidden, *teacher = ctx.saved_tensors
        teacher, scale = TopK(*teacher), grad / hidden.shape[0]
        grads = []
        for r in ctx.chunks:
            with torch.enable_grad():
                rows = hidden[r].detach().requires_grad_()
                logits = ctx.head(rows)  # [c, V]
            grad_logits = _logit_gradient(logits.detach(), teacher.rows(r), ctx.kind, ctx.beta, scale)
            grads.append(torch.autograd.grad(logits, rows, grad_logits)[0])
        return torch.cat(grads), None, None, None, None, None, *(None for _ in teacher)


def chunked_divergence(
    student_hidden: Tensor,
    student_head: Head,
    teacher: TopK,
    kind: str = "forward",
    chunks: Chunks = 1024,
    value: Tensor | None = None,
    beta: float = 0.5,
) -> Tensor:
    """`divergence(student_head(student_hidden), teacher, kind, beta)` over token chunks, for a *frozen* head (in vlsi
    the student's final norm and LM head, which every verbalizer shares; its verb-FFN runs before, on
    `student_hidden`).

    student_hidden [N, d]. Gradients reach `student_hidden` only. Nothing [N, V] is kept for backward: each chunk's
    logits are computed without autograd, then again during backward. `value`: this divergence when it is already
    known (`divergence_matrix` scores every pair with the same arithmetic, bit for bit): the forward pass then only
    records it, and the head runs once per chunk, in backward.
    """
    n = student_hidden.shape[0]
    _check_target(teacher, kind, n)
    _check_tokens(n)
    return _FrozenHeadDivergence.apply(student_hidden, value, student_head, kind, beta, _chunks(n, chunks), *teacher)


@torch.no_grad()
def divergence_matrix(
    student_hiddens: Sequence[Tensor],
    student_heads: Sequence[Head],
    teachers: Sequence[TopK],
    kind: str = "forward",
    chunks: Chunks = 1024,
    beta: float = 0.5,
) -> Tensor:
    """Token-averaged divergences D [t_l, t_s], D[j, i] = divergence(student layer i || teacher target j), no
    autograd: the matching candidates' scores (docs/METHOD.md#memory-and-the-implementation).

    Per token chunk each student layer's log-probs are computed once and kept ([t_s, chunk, V]) against every teacher
    target; nothing outlives its chunk. D[j, i] is bit for bit what `chunked_divergence` gives for the pair.
    """
    if len(student_hiddens) != len(student_heads):
        raise ValueError("need one head per student hidden-state tensor")
    n = student_hiddens[0].shape[0]
    if any(h.shape[0] != n for h in student_hiddens):
        raise ValueError("every student layer must hold the same tokens")
    for teacher in teachers:
        _check_target(teacher, kind, n)
    _check_tokens(n)
    sums = 0
    for rows in _chunks(n, chunks):
        # t_s x [c, V], computed once and held against every teacher target
        logits = [head(h[rows]) for h, head in zip(student_hiddens, student_heads, strict=True)]
        sums = sums + _divergence_sums(logits, [t.rows(rows) for t in teachers], kind, beta)  # [t_l, t_s]
    return sums / n
