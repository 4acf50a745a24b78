"""Losses against float64 references; chunked versions against the plain ones, in value and gradients."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlsi.losses import (
    KINDS,
    TopK,
    chunked_cross_entropy,
    chunked_divergence,
    cross_entropy_from_logits,
    divergence,
    divergence_matrix,
    log_probs,
    row_chunks,
    shared_vocab_size,
    token_divergence,
    top_k,
)

F64 = torch.float64
# every divergence against a whole teacher target (k = 0) and a top-k one; l2 needs the whole distribution
KIND_AND_K = [(kind, k) for kind in KINDS for k in (0, 4) if not (kind == "l2" and k)]


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


def _whole(logits):
    """The teacher target of logits [N, V] as the live teacher gives it: the whole log-probabilities."""
    return TopK(log_probs(logits))


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
    out = token_divergence(s, _whole(t), kind)
    assert out.shape == (7,) and out.dtype == F64
    torch.testing.assert_close(out, _reference(s, t, kind), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(divergence(s, _whole(t), kind), out.mean())


def test_forward_and_reverse_match_torch_kl_div():
    s, t = _logits(seed=3), _logits(seed=4)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    # F.kl_div(input, target) = KL(target || input)
    forward = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    reverse = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_divergence(s, _whole(t), "forward"), forward)
    torch.testing.assert_close(token_divergence(s, _whole(t), "reverse"), reverse)
    torch.testing.assert_close(token_divergence(t, _whole(s), "forward"), reverse)


def test_jsd_is_symmetric_and_bounded():
    s, t = _logits(seed=5, scale=10.0), _logits(seed=6, scale=10.0)
    jsd = token_divergence(s, _whole(t), "jsd")
    torch.testing.assert_close(jsd, token_divergence(t, _whole(s), "jsd"))
    assert (jsd <= math.log(2) + 1e-12).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_matches_a_hand_computed_reference(beta):
    """GKD's generalised JSD: beta KL(t || m) + (1 - beta) KL(s || m), m = beta p_t + (1 - beta) p_s, written out in
    probabilities; through every loss that takes it (plain, chunked, the candidate scores) alike."""
    s, t = _logits(seed=11), _logits(seed=12)
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    m = beta * p_t + (1 - beta) * p_s
    want = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    torch.testing.assert_close(token_divergence(s, _whole(t), "jsd", beta), want, rtol=1e-10, atol=1e-12)
    head = nn.Identity()
    chunked = chunked_divergence(s, head, _whole(t), "jsd", chunks=3, beta=beta)
    scored = divergence_matrix([s], [head], [_whole(t)], "jsd", 3, beta)[0, 0]
    torch.testing.assert_close(chunked, want.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scored, want.mean(), rtol=1e-10, atol=1e-12)
    if beta != 0.5:  # and not the symmetric JSD
        assert not torch.allclose(want, _reference(s, t, "jsd"))


def test_jsd_beta_one_half_is_the_symmetric_jsd_bit_for_bit():
    """The default beta keeps the arithmetic the symmetric JSD had before beta existed."""
    s, t = _logits(seed=13, dtype=torch.float32), _logits(seed=14, dtype=torch.float32)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    lm = torch.logaddexp(ls, lt) - math.log(2.0)
    symmetric = 0.5 * (lt.exp() * (lt - lm)).sum(-1) + 0.5 * (ls.exp() * (ls - lm)).sum(-1)
    assert torch.equal(token_divergence(s, _whole(t), "jsd"), symmetric)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_identical_and_nonnegative(kind):
    s = _logits(seed=7)
    torch.testing.assert_close(token_divergence(s, _whole(s.clone()), kind), torch.zeros(7, dtype=F64))
    # a constant shift of the logits is the same distribution
    torch.testing.assert_close(
        token_divergence(s, _whole(s + 5.0), kind), torch.zeros(7, dtype=F64), atol=1e-12, rtol=0
    )
    for seed in range(10):
        s, t = _logits(n=20, v=50, seed=seed, scale=0.1 * (seed + 1)), _logits(n=20, v=50, seed=seed + 100)
        assert (token_divergence(s, _whole(t), kind) >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_give_fp32_close_to_fp64(kind):
    s, t = _logits(n=16, v=1000, seed=8, dtype=torch.bfloat16), _logits(n=16, v=1000, seed=9, dtype=torch.bfloat16)
    out = token_divergence(s, _whole(t), kind)
    assert out.dtype == torch.float32
    # reference on the same (bf16-rounded) values: only the fp32 maths differs
    torch.testing.assert_close(out.double(), _reference(s, t, kind), rtol=1e-4, atol=1e-5)


def test_bad_kind_and_mismatched_widths_raise():
    s = _logits()
    with pytest.raises(ValueError, match="unknown divergence kind"):
        token_divergence(s, _whole(s), "kl")
    with pytest.raises(ValueError, match="shared_vocab_size"):
        token_divergence(s, _whole(_logits(v=12)))


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


def _prefix(d, seed):
    # the trained map in front of a frozen head (a verb-FFN's place)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, d, bias=False), nn.SiLU()).to(F64)


def _frozen_head(d, v, seed, dtype=F64):
    # the frozen final norm and LM head every verbalizer shares
    torch.manual_seed(seed)
    return nn.Sequential(nn.RMSNorm(d), nn.Linear(d, v, bias=False)).to(dtype).requires_grad_(False)


def _target(n, v, seed, k):
    # a teacher target: whole (k = 0, the live teacher) or the top k as a cache keeps it
    return top_k(_logits(n=n, v=v, seed=seed).log_softmax(-1), k)


@pytest.mark.parametrize("kind, k", KIND_AND_K)
@pytest.mark.parametrize("chunk_size", [4, 13, 100])
def test_chunked_divergence_matches_plain(kind, k, chunk_size):
    """Against plain autograd through whole logits, in value and in the gradients to the hidden states and to the
    trained map in front of the frozen head; given its value as `divergence_matrix` scores it, bit for bit the same."""
    n, d, v = 13, 6, 17
    prefix, head = _prefix(d, seed=0), _frozen_head(d, v, seed=1)
    hidden = torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    teacher = _target(n, v, seed=3, k=k)
    trained = [hidden, *prefix.parameters()]

    plain = divergence(head(prefix(hidden)), teacher, kind)
    chunked = chunked_divergence(prefix(hidden), head, teacher, kind, chunk_size)
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-12)
    chunked_grads = _grads(chunked, trained)
    for g_chunked, g_plain in zip(chunked_grads, _grads(plain, trained), strict=True):
        torch.testing.assert_close(g_chunked, g_plain, rtol=1e-9, atol=1e-12)

    scored = divergence_matrix([prefix(hidden)], [head], [teacher], kind, chunk_size)[0, 0]
    given = chunked_divergence(prefix(hidden), head, teacher, kind, chunk_size, value=scored)
    assert torch.equal(scored, chunked.detach()) and torch.equal(given, chunked)
    for g_given, g_chunked in zip(_grads(given, trained), chunked_grads, strict=True):
        assert torch.equal(g_given, g_chunked)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_divergence_gradient_is_the_numerical_one_and_never_reaches_the_teacher(kind):
    n, d, v = 7, 4, 9
    head = _frozen_head(d, v, seed=4)
    hidden = torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    teacher = TopK(_logits(n=n, v=v, seed=6).log_softmax(-1).requires_grad_())
    assert torch.autograd.gradcheck(lambda h: chunked_divergence(h, head, teacher, kind, chunks=3), (hidden,))
    chunked_divergence(hidden, head, teacher, kind, chunks=3).backward()
    assert teacher.log_probs.grad is None and hidden.grad is not None


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


@pytest.mark.parametrize("kind, k", KIND_AND_K)
@pytest.mark.parametrize("chunk_size", [4, 100])
def test_divergence_matrix_matches_double_loop(kind, k, chunk_size):
    n, ds, dt, v, t_s, t_l = 13, 6, 10, 17, 2, 3
    student_heads = [_head(ds, v, seed=i) for i in range(t_s)]
    teacher_heads = [_head(dt, v, seed=10 + j) for j in range(t_l)]
    student_hiddens = [torch.randn(n, ds, dtype=F64, requires_grad=True) for _ in range(t_s)]
    teachers = [top_k(log_probs(head(torch.randn(n, dt, dtype=F64))).detach(), k) for head in teacher_heads]

    d = divergence_matrix(student_hiddens, student_heads, teachers, kind, chunk_size)
    assert d.shape == (t_l, t_s) and not d.requires_grad
    for j in range(t_l):
        for i in range(t_s):
            ref = divergence(student_heads[i](student_hiddens[i]), teachers[j], kind)
            torch.testing.assert_close(d[j, i], ref.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_bf16_heads_score_and_train_in_fp32_close_to_fp64(kind):
    """bf16 logits from a bf16 head (a GPU's training dtype): the scores are taken in fp32 (the forward KL's
    written-out form on an fp32 copy, the logits left as they were), close to float64 maths on the same bf16 logits;
    the matched term's gradient comes back in bf16, close to plain autograd through the same bf16 head."""
    n, d, v = 13, 6, 300
    head = _frozen_head(d, v, seed=1, dtype=torch.bfloat16)
    hidden = torch.randn(n, d, generator=torch.Generator().manual_seed(2)).bfloat16().requires_grad_()
    teacher = _target(n, v, seed=3, k=0)
    scored = divergence_matrix([hidden], [head], [teacher], kind, 4)[0, 0]
    given = chunked_divergence(hidden, head, teacher, kind, 4, value=scored)
    (grad,) = _grads(given, [hidden])
    assert scored.dtype == torch.float32 and grad.dtype == torch.bfloat16

    plain = divergence(head(hidden), teacher, kind)
    wide = divergence(head(hidden).double(), TopK(teacher.log_probs.double()), kind)
    torch.testing.assert_close(scored.double(), wide.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, _grads(plain, [hidden])[0], rtol=2e-2, atol=1e-4)


def test_padding_with_empty_chunks_changes_nothing_but_the_number_of_head_calls():
    """Row ranges padded with empty ones (`row_chunks(n, size, at_least)`, as DeepSpeed ZeRO-3 needs: every process
    calls the heads equally often) change nothing but the calls: the same values and gradients, and one call of the
    head per range in forward and again in backward (backward only, for a divergence whose value is given)."""
    n, d, v = 13, 6, 17
    head, frozen = _head(d, v, seed=0), _frozen_head(d, v, seed=1)
    hidden = torch.randn(n, d, dtype=F64, requires_grad=True)
    teacher = _target(n, v, seed=2, k=0)
    targets = torch.randint(0, v, (n,))
    calls = []
    for module in (head, frozen):
        module.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    padding = row_chunks(n, 4, at_least=7)
    forward = [4, 4, 4, 1, 0, 0, 0]

    cases = [
        (lambda chunks=4: chunked_cross_entropy(hidden, head, targets, chunks), [hidden, *head.parameters()], True),
        (lambda chunks=4: chunked_divergence(hidden, frozen, teacher, "forward", chunks), [hidden], False),
    ]
    for loss, trained, reversed_in_backward in cases:
        calls.clear()
        padded = loss(padding)
        padded_grads = _grads(padded, trained)
        # a checkpoint recomputes the chunks in reverse order, the divergence's own backward in order
        assert calls == forward + (forward[::-1] if reversed_in_backward else forward), "the empty ones too"
        plain = loss()
        torch.testing.assert_close(padded, plain, rtol=0, atol=0)
        for a, b in zip(padded_grads, _grads(plain, trained), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    calls.clear()
    args = ([hidden], [frozen], [teacher], "forward")
    scored = divergence_matrix(*args, padding)
    torch.testing.assert_close(scored, divergence_matrix(*args, 4), rtol=0, atol=0)
    assert calls == forward + [4, 4, 4, 1]
    calls.clear()
    _grads(chunked_divergence(hidden, frozen, teacher, "forward", padding, value=scored[0, 0]), [hidden])
    assert calls == forward, "a given value: the head runs in backward alone"


def test_chunked_bad_input_raises():
    head, frozen = _head(4, 5, seed=0), _frozen_head(4, 5, seed=1)
    teacher = _target(3, 5, seed=2, k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(torch.randn(3, 4, dtype=F64), frozen, teacher, "forward", 0)
    for gappy in ([slice(0, 2)], [slice(0, 1), slice(2, 3)], [slice(0, 3), slice(0, 3)]):
        with pytest.raises(ValueError, match="do not cover rows 0..3"):
            chunked_cross_entropy(torch.randn(3, 4, dtype=F64), head, torch.zeros(3, dtype=torch.long), gappy)
        with pytest.raises(ValueError, match="do not cover rows 0..3"):
            chunked_divergence(torch.randn(3, 4, dtype=F64), frozen, teacher, "forward", gappy)
    with pytest.raises(ValueError, match="same tokens"):
        chunked_divergence(torch.randn(2, 4, dtype=F64), frozen, teacher)
    with pytest.raises(ValueError, match="same tokens"):
        divergence_matrix([torch.randn(2, 4, dtype=F64)], [frozen], [teacher])
    with pytest.raises(ValueError, match="no tokens"):
        chunked_cross_entropy(torch.randn(0, 4, dtype=F64), head, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        chunked_divergence(torch.randn(0, 4, dtype=F64), frozen, _target(0, 5, seed=3, k=0))
    with pytest.raises(ValueError, match="unknown divergence kind"):
        divergence_matrix([torch.randn(3, 4, dtype=F64)], [frozen], [teacher], "kl")


def test_chunked_divergence_keeps_no_logits_for_backward():
    """Bytes held for backward beyond what the caller holds anyway (the teacher target): the hidden states and the
    trained map's activations, never [N, V] logits; the plain version keeps several [N, V] tensors."""
    n, d, v, chunk = 64, 8, 4096, 16
    prefix, head = _prefix(d, seed=0).float(), _frozen_head(d, v, seed=1, dtype=torch.float32)
    student_hidden = torch.randn(n, d, requires_grad=True)
    teacher = TopK(log_probs(torch.randn(n, v)))
    held = []

    def pack(t):
        if t.data_ptr() != teacher.log_probs.data_ptr():
            held.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_divergence(prefix(student_hidden), head, teacher, "forward", chunk)
    assert 0 < sum(held) < n * v * 4 / 16

    held.clear()  # the same count sees the plain version's logits
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        divergence(head(prefix(student_hidden)), teacher)
    assert sum(held) > n * v * 4


# --- the top-k estimator against a cached teacher (docs/CACHE.md#the-estimator) ---

TOPK_KINDS = ("forward", "reverse", "jsd")


@pytest.mark.parametrize("kind", KINDS)
def test_topk_whole_distribution_is_the_exact_divergence(kind):
    s, t = _logits(seed=20), _logits(seed=21)
    cached = top_k(t.log_softmax(-1), 0)
    assert cached.ids is None
    torch.testing.assert_close(token_divergence(s, cached, kind), token_divergence(s, _whole(t), kind), rtol=0, atol=0)


@pytest.mark.parametrize("kind", TOPK_KINDS)
def test_topk_at_full_vocabulary_equals_the_exact_divergence_in_value_and_gradient(kind):
    t = _logits(seed=22)
    s1, s2 = _logits(seed=23).requires_grad_(), _logits(seed=23).requires_grad_()
    cached = top_k(t.log_softmax(-1), t.shape[-1])  # k = V: every token kept, in another order, tail empty
    assert torch.isneginf(cached.log_tail).all()
    estimate, exact = token_divergence(s1, cached, kind), token_divergence(s2, _whole(t), kind)
    torch.testing.assert_close(estimate, exact, rtol=1e-10, atol=1e-12)
    estimate.sum().backward()
    exact.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", TOPK_KINDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_estimate_never_exceeds_the_exact_divergence(kind, k):
    s, t = _logits(seed=24, v=11), _logits(seed=25, v=11)
    estimate = token_divergence(s, top_k(t.log_softmax(-1), k), kind)
    assert (estimate <= token_divergence(s, _whole(t), kind) + 1e-12).all()
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
    gap = token_divergence(s, _whole(t), "forward") - token_divergence(s, cached, "forward")
    torch.testing.assert_close(gap, tail_t * within_kl, rtol=1e-9, atol=1e-12)


def test_topk_l2_needs_the_whole_distribution():
    with pytest.raises(ValueError, match="cache.top_k=0"):
        token_divergence(_logits(), top_k(_logits(seed=9).log_softmax(-1), 3), "l2")
