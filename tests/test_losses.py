"""Losses against float64 references; chunked versions against the plain ones, in value and gradients."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlsi import losses
from vlsi.losses import (
    KINDS,
    chunked_cross_entropy,
    chunked_divergence,
    cross_entropy_from_logits,
    divergence,
    divergence_matrix,
    kl_from_logits,
    row_chunks,
    shared_vocab_size,
    top_k,
    topk_divergence,
    topk_divergence_matrix,
    topk_kl_from_logits,
)

F64 = torch.float64


def _logits(n=7, v=11, seed=0, scale=3.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=g, dtype=F64)).to(dtype)


def _reference(s, t, kind):
    # explicit float64 sums over probabilities
    p_s, p_t = s.double().softmax(-1), t.double().softmax(-1)
    if kind == "l2":
        return ((p_s.log() - p_t.log()) ** 2).sum(-1) / s.shape[-1]
    if kind == "forward":
        return (p_t * (p_t / p_s).log()).sum(-1)
    if kind == "reverse":
        return (p_s * (p_s / p_t).log()).sum(-1)
    m = 0.5 * (p_s + p_t)
    return 0.5 * (p_t * (p_t / m).log()).sum(-1) + 0.5 * (p_s * (p_s / m).log()).sum(-1)


def _head(d_in, v, seed, dtype=F64):
    # verb-FFN-like map -> RMSNorm -> LM head, small enough to compare gradients exactly
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, d_in, bias=False), nn.SiLU(), nn.RMSNorm(d_in), nn.Linear(d_in, v, bias=False)
    ).to(dtype)


def test_shared_vocab_size():
    assert shared_vocab_size(151657, 151936, 152064) == 151657
    assert shared_vocab_size(160000, 151936, 152064) == 151936
    assert shared_vocab_size(100) == 100


@pytest.mark.parametrize("kind", KINDS)
def test_kl_matches_explicit_reference(kind):
    s, t = _logits(seed=1), _logits(seed=2)
    out = kl_from_logits(s, t, kind)
    assert out.shape == (7,) and out.dtype == F64
    torch.testing.assert_close(out, _reference(s, t, kind), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(divergence(s, t, kind), out.mean())


def test_forward_and_reverse_match_torch_kl_div():
    s, t = _logits(seed=3), _logits(seed=4)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    # F.kl_div(input, target) = KL(target || input)
    forward = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    reverse = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_from_logits(s, t, "forward"), forward)
    torch.testing.assert_close(kl_from_logits(s, t, "reverse"), reverse)
    torch.testing.assert_close(kl_from_logits(t, s, "forward"), reverse)


def test_jsd_is_symmetric_and_bounded():
    s, t = _logits(seed=5, scale=10.0), _logits(seed=6, scale=10.0)
    jsd = kl_from_logits(s, t, "jsd")
    torch.testing.assert_close(jsd, kl_from_logits(t, s, "jsd"))
    assert (jsd <= math.log(2) + 1e-12).all()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_identical_and_nonnegative(kind):
    s = _logits(seed=7)
    torch.testing.assert_close(kl_from_logits(s, s.clone(), kind), torch.zeros(7, dtype=F64))
    # a constant shift of the logits is the same distribution
    torch.testing.assert_close(kl_from_logits(s, s + 5.0, kind), torch.zeros(7, dtype=F64), atol=1e-12, rtol=0)
    for seed in range(10):
        s, t = _logits(n=20, v=50, seed=seed, scale=0.1 * (seed + 1)), _logits(n=20, v=50, seed=seed + 100)
        assert (kl_from_logits(s, t, kind) >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_give_fp32_close_to_fp64(kind):
    s, t = _logits(n=16, v=1000, seed=8, dtype=torch.bfloat16), _logits(n=16, v=1000, seed=9, dtype=torch.bfloat16)
    out = kl_from_logits(s, t, kind)
    assert out.dtype == torch.float32
    # reference on the same (bf16-rounded) values: only the fp32 maths differs
    torch.testing.assert_close(out.double(), _reference(s, t, kind), rtol=1e-4, atol=1e-5)


def test_bad_kind_and_mismatched_widths_raise():
    s = _logits()
    with pytest.raises(ValueError, match="unknown divergence kind"):
        kl_from_logits(s, s, "kl")
    with pytest.raises(ValueError, match="shared_vocab_size"):
        kl_from_logits(s, _logits(v=12))


def test_cross_entropy_from_logits():
    logits, targets = _logits(n=9, v=11, seed=10), torch.randint(0, 11, (9,))
    torch.testing.assert_close(cross_entropy_from_logits(logits, targets), F.cross_entropy(logits, targets))
    targets[:3] = -100  # ignored, mean over the rest
    torch.testing.assert_close(cross_entropy_from_logits(logits, targets), F.cross_entropy(logits[3:], targets[3:]))
    out = cross_entropy_from_logits(logits.bfloat16(), targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), F.cross_entropy(logits.bfloat16().double(), targets), rtol=1e-5, atol=1e-6)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [4, 13, 100])
def test_chunked_divergence_matches_plain(kind, chunk_size):
    n, ds, dt, v = 13, 6, 10, 17
    student_head, teacher_head = _head(ds, v, seed=0), _head(dt, v, seed=1)
    student_hidden = torch.randn(n, ds, dtype=F64, requires_grad=True)
    teacher_hidden = torch.randn(n, dt, dtype=F64, requires_grad=True)
    trained = [student_hidden, *student_head.parameters()]

    plain = divergence(student_head(student_hidden), teacher_head(teacher_hidden).detach(), kind)
    chunked = chunked_divergence(student_hidden, student_head, teacher_hidden, teacher_head, kind, chunk_size)
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-12)
    for g_chunked, g_plain in zip(_grads(chunked, trained), _grads(plain, trained), strict=True):
        torch.testing.assert_close(g_chunked, g_plain, rtol=1e-9, atol=1e-12)

    # nothing flows to the teacher
    chunked = chunked_divergence(student_hidden, student_head, teacher_hidden, teacher_head, kind, chunk_size)
    chunked.backward()
    assert teacher_hidden.grad is None and all(p.grad is None for p in teacher_head.parameters())
    assert student_hidden.grad is not None and all(p.grad is not None for p in student_head.parameters())


@pytest.mark.parametrize("chunk_size", [4, 13, 100])
def test_chunked_cross_entropy_matches_plain(chunk_size):
    n, d, v = 13, 6, 17
    head = _head(d, v, seed=2)
    hidden = torch.randn(n, d, dtype=F64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[[0, 5, 6]] = -100
    trained = [hidden, *head.parameters()]

    plain = F.cross_entropy(head(hidden), targets)
    chunked = chunked_cross_entropy(hidden, head, targets, chunk_size)
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-12)
    for g_chunked, g_plain in zip(_grads(chunked, trained), _grads(plain, trained), strict=True):
        torch.testing.assert_close(g_chunked, g_plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [4, 100])
def test_divergence_matrix_matches_double_loop(kind, chunk_size):
    n, ds, dt, v, t_s, t_l = 13, 6, 10, 17, 2, 3
    student_heads = [_head(ds, v, seed=i) for i in range(t_s)]
    teacher_heads = [_head(dt, v, seed=10 + j) for j in range(t_l)]
    student_hiddens = [torch.randn(n, ds, dtype=F64, requires_grad=True) for _ in range(t_s)]
    teacher_hiddens = [torch.randn(n, dt, dtype=F64) for _ in range(t_l)]

    d = divergence_matrix(student_hiddens, student_heads, teacher_hiddens, teacher_heads, kind, chunk_size)
    assert d.shape == (t_l, t_s) and not d.requires_grad
    for j in range(t_l):
        for i in range(t_s):
            ref = divergence(student_heads[i](student_hiddens[i]), teacher_heads[j](teacher_hiddens[j]), kind)
            torch.testing.assert_close(d[j, i], ref.detach(), rtol=1e-10, atol=1e-12)


def test_padding_with_empty_chunks_changes_nothing_but_the_number_of_head_calls():
    """Row ranges padded with empty ones (`row_chunks(n, size, at_least)`, as DeepSpeed ZeRO-3 needs: every process
    calls the heads equally often) change nothing but the calls: the same values and gradients, and one call of the
    student head per range in forward and again in backward."""
    n, ds, dt, v = 13, 6, 10, 17
    student_head, teacher_head = _head(ds, v, seed=0), _head(dt, v, seed=1)
    student_hidden = torch.randn(n, ds, dtype=F64, requires_grad=True)
    teacher_hidden = torch.randn(n, dt, dtype=F64)
    targets = torch.randint(0, v, (n,))
    trained = [student_hidden, *student_head.parameters()]
    calls = []
    student_head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))

    losses = [
        lambda chunks=4: chunked_divergence(
            student_hidden, student_head, teacher_hidden, teacher_head, "forward", chunks
        ),
        lambda chunks=4: chunked_cross_entropy(student_hidden, student_head, targets, chunks),
    ]
    padding = row_chunks(n, 4, at_least=7)
    for loss in losses:
        calls.clear()
        padded = loss(padding)
        padded_grads = _grads(padded, trained)
        forward = [4, 4, 4, 1, 0, 0, 0]
        assert calls == forward + forward[::-1], "backward recomputes every chunk, the empty ones too"
        plain = loss()
        torch.testing.assert_close(padded, plain, rtol=0, atol=0)
        for a, b in zip(padded_grads, _grads(plain, trained), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    calls.clear()
    args = ([student_hidden], [student_head], [teacher_hidden], [teacher_head], "forward")
    torch.testing.assert_close(divergence_matrix(*args, padding), divergence_matrix(*args, 4), rtol=0, atol=0)
    assert calls == [4, 4, 4, 1, 0, 0, 0] + [4, 4, 4, 1]


def test_chunked_bad_input_raises():
    head = _head(4, 5, seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(torch.randn(3, 4, dtype=F64), head, torch.randn(3, 4, dtype=F64), head, "forward", 0)
    for gappy in ([slice(0, 2)], [slice(0, 1), slice(2, 3)], [slice(0, 3), slice(0, 3)]):
        with pytest.raises(ValueError, match="do not cover rows 0..3"):
            chunked_cross_entropy(torch.randn(3, 4, dtype=F64), head, torch.zeros(3, dtype=torch.long), gappy)
    with pytest.raises(ValueError, match="same tokens"):
        chunked_divergence(torch.randn(3, 4, dtype=F64), head, torch.randn(2, 4, dtype=F64), head)
    with pytest.raises(ValueError, match="no tokens"):
        chunked_cross_entropy(torch.randn(0, 4, dtype=F64), head, torch.zeros(0, dtype=torch.long))


def test_chunked_divergence_keeps_no_logits_for_backward(monkeypatch):
    # Bytes held for backward = tensors autograd saves outside the checkpoints + tensors the checkpoints keep as
    # inputs (saved_tensors_hooks do not see inside a non-reentrant checkpoint, which installs its own).
    n, d, v, chunk = 64, 8, 4096, 16
    student_head, teacher_head = _head(d, v, seed=0, dtype=torch.float32), _head(d, v, seed=1, dtype=torch.float32)
    student_hidden = torch.randn(n, d, requires_grad=True)
    teacher_hidden = torch.randn(n, d)
    held = []

    def counting_checkpoint(fn, *args, **kwargs):
        held.extend(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    def pack(t):
        held.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(losses, "checkpoint", counting_checkpoint)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_divergence(student_hidden, student_head, teacher_hidden, teacher_head, "forward", chunk)
    assert sum(held) < n * v * 4 / 16

    held.clear()  # the same count sees the plain version's logits
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        divergence(student_head(student_hidden), teacher_head(teacher_hidden).detach())
    assert sum(held) > n * v * 4


# --- the top-k estimator against a cached teacher (docs/CACHE.md#the-estimator) ---

TOPK_KINDS = ("forward", "reverse", "jsd")


@pytest.mark.parametrize("kind", KINDS)
def test_topk_whole_distribution_is_the_exact_divergence(kind):
    s, t = _logits(seed=20), _logits(seed=21)
    cached = top_k(t.log_softmax(-1), 0)
    assert cached.ids is None
    torch.testing.assert_close(topk_kl_from_logits(s, cached, kind), kl_from_logits(s, t, kind), rtol=0, atol=0)


@pytest.mark.parametrize("kind", TOPK_KINDS)
def test_topk_at_full_vocabulary_equals_the_exact_divergence_in_value_and_gradient(kind):
    t = _logits(seed=22)
    s1, s2 = _logits(seed=23).requires_grad_(), _logits(seed=23).requires_grad_()
    cached = top_k(t.log_softmax(-1), t.shape[-1])  # k = V: every token kept, in another order, tail empty
    assert torch.isneginf(cached.log_tail).all()
    estimate, exact = topk_kl_from_logits(s1, cached, kind), kl_from_logits(s2, t, kind)
    torch.testing.assert_close(estimate, exact, rtol=1e-10, atol=1e-12)
    estimate.sum().backward()
    exact.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", TOPK_KINDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_estimate_never_exceeds_the_exact_divergence(kind, k):
    s, t = _logits(seed=24, v=11), _logits(seed=25, v=11)
    estimate = topk_kl_from_logits(s, top_k(t.log_softmax(-1), k), kind)
    assert (estimate <= kl_from_logits(s, t, kind) + 1e-12).all()
    assert torch.isfinite(estimate).all() and (estimate >= -1e-12).all()


def test_topk_forward_bias_is_tail_mass_times_kl_within_the_tail():
    s, t, k = _logits(seed=26), _logits(seed=27), 4
    cached = top_k(t.log_softmax(-1), k)
    p_t, p_s = t.softmax(-1), s.softmax(-1)
    outside = torch.ones_like(p_t, dtype=torch.bool).scatter(-1, cached.ids, False)  # [N, V]
    tail_t, tail_s = (p_t * outside).sum(-1), (p_s * outside).sum(-1)
    torch.testing.assert_close(cached.log_tail.exp(), tail_t)
    within_t, within_s = p_t * outside / tail_t[:, None], p_s * outside / tail_s[:, None]
    within_kl = torch.where(outside, within_t * (within_t / within_s).log(), 0.0).sum(-1)
    gap = kl_from_logits(s, t, "forward") - topk_kl_from_logits(s, cached, "forward")
    torch.testing.assert_close(gap, tail_t * within_kl, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("k", [0, 4])
def test_chunked_topk_divergence_matches_plain(chunk_size, k):
    n, d, v = 9, 6, 13
    head = _head(d, v, seed=3)
    hidden = torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    cached = top_k(_logits(n=n, v=v, seed=28).log_softmax(-1), k)
    plain = topk_divergence(head(hidden), cached)
    plain.backward()
    grads = [hidden.grad.clone(), *(p.grad.clone() for p in head.parameters())]
    hidden.grad = None
    head.zero_grad()
    chunked = losses.chunked_topk_divergence(
        hidden, head, cached, "forward", losses.row_chunks(n, chunk_size, at_least=12)
    )
    chunked.backward()
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(grads, [hidden.grad, *(p.grad for p in head.parameters())]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", TOPK_KINDS)
def test_topk_divergence_matrix_matches_double_loop(kind):
    n, d, v, t_s, t_l = 8, 5, 12, 2, 3
    heads = [_head(d, v, seed=i) for i in range(t_s)]
    hiddens = [torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(30 + i)) for i in range(t_s)]
    teachers = [top_k(_logits(n=n, v=v, seed=40 + j).log_softmax(-1), 5) for j in range(t_l)]
    d_mat = topk_divergence_matrix(hiddens, heads, teachers, kind, chunks=3)
    with torch.no_grad():
        loop = torch.tensor(
            [[topk_divergence(heads[i](hiddens[i]), teachers[j], kind).item() for i in range(t_s)] for j in range(t_l)],
            dtype=F64,
        )
    torch.testing.assert_close(d_mat, loop)


def test_topk_l2_needs_the_whole_distribution():
    with pytest.raises(ValueError, match="cache.top_k=0"):
        topk_kl_from_logits(_logits(), top_k(_logits(seed=9).log_softmax(-1), 3), "l2")
