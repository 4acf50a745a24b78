"""Each stage trains what it should and leaves everything else bit-identical."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import vlsi.stages.interact as interact_stage
import vlsi.stages.sft as sft_stage
import vlsi.stages.verbalize as verbalize_stage
from vlsi.config import load_config
from vlsi.data import read_dataset, split_batch
from vlsi.matching import layer_match
from vlsi.models.family import capture, model_parts
from vlsi.models.loading import load_model
from vlsi.models.verbalizer import Verbalizers
from vlsi.stages.interact import interact
from vlsi.stages.loop import MetricsLog, train
from vlsi.toy import write_digits_dataset, write_tiny_pair


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    teacher, student = write_tiny_pair(root)
    data = write_digits_dataset(root, n=8)
    return root, str(teacher), str(student), data


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def _cfg(toy, *overrides, output=None):
    root, teacher, student, data = toy
    return load_config(
        None,
        ["verbalizer.teacher_layers=[0,2,4]", "verbalizer.student_layers=[0,2]", "chunk_size=7", *overrides],
        teacher=teacher,
        student=student,
        output=str(output or root / "out"),
    )


def _samples(toy):
    return read_dataset(toy[3])[0]


def test_verbalize_trains_only_the_verbalizers(toy, tmp_path):
    cfg = _cfg(toy, "verbalize.max_steps=2", "verbalize.grad_accum=2", "verbalize.lr=1e-2", output=tmp_path)
    run = verbalize_stage.setup(cfg, cfg.student, "student", _samples(toy))
    model, _ = run.step.frozen
    verb = run.step.verbalizers
    before_model, before_verb = _snapshot(model), _snapshot(verb)
    assert {n for n, _ in run.step.named_parameters()} == {f"verbalizers.{n}" for n in before_verb}
    train(run.accelerator, run.step, run.loader, cfg.verbalize, "verbalize/student", MetricsLog(tmp_path / "m.jsonl"))
    assert not _changed(before_model, model), "backbone, final norm and LM head stay bit-identical"
    assert _changed(before_verb, verb) == set(before_verb), "every verb-FFN weight trains"
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"loss/layer0"' in lines[0] and '"loss/layer2"' in lines[0]


@pytest.mark.parametrize("lora", [True, False])
def test_interact_freezes_teacher_head_and_vision(toy, tmp_path, lora):
    run = _interaction(
        toy,
        tmp_path,
        "interact.max_steps=2",
        "interact.grad_accum=2",
        "interact.lr=1e-2",
        f"interact.lora.enabled={str(lora).lower()}",
        "interact.lora.r=4",
    )
    step = run.step
    teacher, t_verb = step.teacher.model, step.teacher.verbalizers
    student, s_verb, (s_parts,) = step.student, step.verbalizers, step.s_parts
    before_teacher, before_t_verb = _snapshot(teacher), _snapshot(t_verb)
    before_student, before_s_verb = _snapshot(student), _snapshot(s_verb)
    head_before = s_parts.lm_head.weight.detach().clone()
    norm_before = [p.detach().clone() for p in s_parts.norm.parameters()]
    vision_before = [p.detach().clone() for m in s_parts.vision for p in m.parameters()]
    matches = []
    cfg = step.cfg
    train(
        run.accelerator,
        step,
        run.loader,
        cfg,
        "interact",
        MetricsLog(tmp_path / "m.jsonl"),
        on_micro_step=lambda s, m: matches.append(m),
    )

    assert not _changed(before_teacher, teacher) and not _changed(before_t_verb, t_verb), "teacher frozen"
    assert _changed(before_s_verb, s_verb) == set(before_s_verb), "student verbalizers train"
    assert torch.equal(head_before, s_parts.lm_head.weight), "LM head frozen"
    assert all(torch.equal(a, p) for a, p in zip(norm_before, s_parts.norm.parameters())), "final norm frozen"
    assert all(torch.equal(a, p) for a, p in zip(vision_before, (p for m in s_parts.vision for p in m.parameters())))
    changed = _changed(before_student, student)
    if lora:
        assert changed and all("lora_" in n for n in changed), "only LoRA adapters change"
    else:
        assert any("language_model.layers" in n for n in changed)
    assert len(matches) == 4 and all(len(m) == 2 and m[0][0] < m[1][0] for m in matches)


def test_sft_trains_lora_only(toy, tmp_path):
    cfg = _cfg(toy, "sft.max_steps=2", "sft.grad_accum=1", "sft.lr=1e-2", "sft.lora.r=4", output=tmp_path)
    run = sft_stage.setup(cfg, cfg.student, _samples(toy))
    before = _snapshot(run.step.student)
    train(run.accelerator, run.step, run.loader, cfg.sft, "sft", MetricsLog(tmp_path / "m.jsonl"))
    changed = _changed(before, run.step.student)
    assert changed and all("lora_" in n for n in changed)


def _with_verbalizers(cfg, out):
    """Fresh verbalizers in OUT/verbalizers, as stage 1 leaves them: teacher blocks [0, 2, 4], student [0, 2]."""
    torch.manual_seed(0)  # the same fresh weights every time
    for who, path, layers in (("teacher", cfg.teacher, [0, 2, 4]), ("student", cfg.student, [0, 2])):
        Verbalizers(model_parts(load_model(path, torch.float32)).hidden_size, layers).save(out / "verbalizers" / who)


def _interaction(toy, out, *overrides):
    """The interaction stage as `vlsi train` sets it up (`interact.setup`), on the toy data."""
    cfg = _cfg(toy, *overrides, output=out)
    _with_verbalizers(cfg, out)
    return interact_stage.setup(cfg, out, _samples(toy))


@pytest.mark.parametrize(
    "intermediate, last",
    [("kld", "kld"), ("l2", "kld"), ("ce", "ce"), ("ce", "none"), ("kld", "none"), ("none", "kld"), ("l2", "ce")],
)
def test_interaction_loss_operations(toy, tmp_path, intermediate, last):
    """Every intermediate / last-layer loss pair of the paper's ablation
    (docs/METHOD.md#ablations-reported-by-the-paper) gives a loss that is the sum of its logged terms, and trains the
    student verbalizers exactly when an intermediate loss is on."""
    losses = [f"interact.intermediate_loss={intermediate}", f"interact.last_loss={last}"]
    run = _interaction(toy, tmp_path, *losses, "interact.lora.enabled=false")
    loss, logs = run.step(next(iter(run.loader)))
    prefix = {"kld": "kl/", "l2": "l2/", "ce": "ce/", "none": None}[intermediate]
    layer_terms = {k: v for k, v in logs.items() if prefix and k.startswith(prefix)}
    assert len(layer_terms) == (0 if intermediate == "none" else 2)
    assert ("last" in logs) == (last != "none")
    assert ("match" in logs) == (intermediate in ("kld", "l2"))
    assert loss.item() == pytest.approx(sum(layer_terms.values()) + logs.get("last", 0.0), rel=1e-5)
    loss.backward()
    got_grad = all(p.grad is not None for p in run.step.verbalizers.parameters())
    assert got_grad == (intermediate != "none")


@pytest.mark.parametrize("intermediate", ["kld", "ce"])
def test_intermediate_reduction_mean_divides_the_layer_terms_only(toy, tmp_path, intermediate):
    """`interact.intermediate_reduction=mean` against the plain sum on the same batch and the same match draw: the
    layer terms and the last-layer term are the same, the loss adds the layer terms' mean instead of their sum."""
    results = {}
    for reduction in ("sum", "mean"):
        overrides = (f"interact.intermediate_loss={intermediate}", f"interact.intermediate_reduction={reduction}")
        run = _interaction(toy, tmp_path / reduction, *overrides)
        results[reduction] = run.step(next(iter(run.loader)))
    (sum_loss, sum_logs), (mean_loss, mean_logs) = results["sum"], results["mean"]
    terms = [v for k, v in sum_logs.items() if k.startswith(("kl/", "ce/"))]
    assert len(terms) == 2 and terms == [v for k, v in mean_logs.items() if k.startswith(("kl/", "ce/"))]
    assert sum_logs.get("match") == mean_logs.get("match") and sum_logs["last"] == mean_logs["last"]
    assert sum_loss.item() == pytest.approx(sum(terms) + sum_logs["last"], rel=1e-5)
    assert mean_loss.item() == pytest.approx(sum(terms) / 2 + mean_logs["last"], rel=1e-5)


def _loss_and_gradients(toy, out, *overrides):
    """One interaction step under full fine-tuning on the first batch: the loss, its logs and the gradient of every
    trained parameter (zeros where it gets none)."""
    run = _interaction(toy, out, "interact.lora.enabled=false", *overrides)
    loss, logs = run.step(next(iter(run.loader)))
    named = [(n, p) for n, p in run.step.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return loss, logs, {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads, strict=True)}


@pytest.mark.parametrize("intermediate, reduction", [("kld", "sum"), ("kld", "mean"), ("ce", "sum")])
def test_intermediate_weight_multiplies_the_layer_terms_only(toy, tmp_path, intermediate, reduction):
    """`interact.intermediate_weight` λ against the plain sum on the same batch and the same match draw: the loss is
    the last-layer term plus λ times the layer terms (their sum, or their mean), and so are its gradients; λ=1 is the
    default bit for bit, λ=0 leaves the last-layer term alone."""
    layer_settings = (f"interact.intermediate_loss={intermediate}", f"interact.intermediate_reduction={reduction}")
    layers_loss, _, layers_grads = _loss_and_gradients(
        toy, tmp_path / "layers", *layer_settings, "interact.last_loss=none"
    )
    last_loss, last_logs, last_grads = _loss_and_gradients(toy, tmp_path / "last", "interact.intermediate_loss=none")
    default = _loss_and_gradients(toy, tmp_path / "default", *layer_settings)
    for weight in (0.3, 1.0, 0.0):
        out = tmp_path / f"weight{weight}"
        loss, logs, grads = _loss_and_gradients(toy, out, *layer_settings, f"interact.intermediate_weight={weight}")
        assert logs["last"] == last_logs["last"] and logs.get("match") == default[1].get("match")
        torch.testing.assert_close(loss, last_loss + weight * layers_loss)
        assert grads.keys() == layers_grads.keys()
        for name, grad in grads.items():  # the verbalizers get no gradient from the last-layer term
            want = last_grads.get(name, torch.zeros_like(grad)) + weight * layers_grads[name]
            torch.testing.assert_close(grad, want, msg=name)
        if weight == 1.0:
            assert torch.equal(loss, default[0]) and logs == default[1]
            assert all(torch.equal(grad, default[2][name]) for name, grad in grads.items())
        if weight == 0.0:
            assert loss.item() == logs["last"]
            assert all(not grad.any() for name, grad in grads.items() if name.startswith("verbalizers."))


def test_freeze_student_verbalizers_leaves_them_as_stage_1_did(toy, tmp_path):
    """`interact.freeze_student_verbalizers`: the student's verbalizers stay bit for bit as OUT/verbalizers holds them,
    through a step and into OUT/stages/interact/verbalizers; the layer terms alone (no last-layer term here) move
    the backbone through them."""
    overrides = ["interact.max_steps=1", "interact.lr=1e-2", "interact.lora.enabled=false", "interact.last_loss=none"]
    cfg = _cfg(toy, *overrides, "interact.freeze_student_verbalizers=true", output=tmp_path)
    _with_verbalizers(cfg, tmp_path)
    run = interact_stage.setup(cfg, tmp_path, _samples(toy))
    step = run.step
    before_verb, before_student = _snapshot(step.verbalizers), _snapshot(step.student)
    state = train(run.accelerator, step, run.loader, cfg.interact, "interact", MetricsLog(tmp_path / "m.jsonl"))
    assert not _changed(before_verb, step.verbalizers), "student verbalizers frozen"
    assert any(n.startswith("model.language_model.layers.0.") for n in _changed(before_student, step.student))
    interact_stage.save(cfg, tmp_path, run, state)
    stage_1 = Verbalizers.load(tmp_path / "verbalizers" / "student").state_dict()
    saved = Verbalizers.load(tmp_path / "stages" / "interact" / "verbalizers").state_dict()
    assert saved.keys() == stage_1.keys() and all(torch.equal(saved[k], stage_1[k]) for k in stage_1)


@pytest.fixture(scope="module")
def interacted(toy, tmp_path_factory):
    """`interact` as `vlsi train` runs it, with full fine-tuning, from untrained verbalizers: (config, OUT)."""
    out = tmp_path_factory.mktemp("interact")
    cfg = _cfg(
        toy,
        "interact.max_steps=2",
        "interact.grad_accum=2",
        "interact.batch_size=2",
        "interact.lr=1e-2",
        "interact.lora.enabled=false",
        output=out,
    )
    _with_verbalizers(cfg, out)
    interact(cfg, out, MetricsLog(out / "metrics.jsonl"), read_dataset(toy[3])[0])
    return cfg, out


def test_interact_full_fine_tuning_exports_the_initial_final_norm_and_head(interacted):
    """The verbalizer heads share the student's frozen final norm and LM head, also when the whole LLM trains."""
    cfg, out = interacted
    before = model_parts(load_model(cfg.student, torch.float32))
    after = model_parts(load_model(str(out / "stages" / "interact" / "student"), torch.float32))
    for name, a, b in (("final norm", before.norm, after.norm), ("LM head", before.lm_head, after.lm_head)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)), name
    for block, (a, b) in enumerate(zip(before.layers, after.layers, strict=True)):
        assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), f"block {block} trains"


def test_interact_logs_how_sharp_each_match_draw_is(interacted):
    _, out = interacted
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # means over the step's micro-batches of each draw's normalised entropy and top probability
        for layer in (0, 2):
            assert 0.0 <= row[f"match_entropy/layer{layer}"] <= 1.0 and 0.0 < row[f"match_pmax/layer{layer}"] <= 1.0


@pytest.mark.parametrize("strategy", ["random", "bottom_k", "uniform"])
def test_match_sharpness_is_logged_for_sampling_strategies_only(toy, tmp_path, strategy):
    run = _interaction(toy, tmp_path, f"interact.match.strategy={strategy}", "interact.match.bottom_k=1")
    with torch.no_grad():
        _, logs = run.step(next(iter(run.loader)))
    sharpness = {k for k in logs if k.startswith("match_")}
    if strategy != "random":
        assert not sharpness
        return
    assert sharpness == {"match_entropy/layer0", "match_pmax/layer0", "match_entropy/layer2", "match_pmax/layer2"}
    # teacher layers [0, 2, 4], student [0, 2]: student layer 0 draws from teacher layers 0 and 1, uniformly
    assert logs["match_entropy/layer0"] == pytest.approx(1.0) and logs["match_pmax/layer0"] == pytest.approx(0.5)
    # student layer 2 draws from what is left after the first pick: 2 candidates, or 1 (then no choice)
    n = 2 - logs["match"][0][0]
    assert logs["match_entropy/layer2"] == pytest.approx(1.0 if n == 2 else 0.0)
    assert logs["match_pmax/layer2"] == pytest.approx(1 / n)


def _plain_divergence(s_logits, t_logits, kind):
    """Token-averaged divergence of whole logits [N, V], with autograd, written out (F.kl_div for the KLs)."""
    ls, lt = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    if kind == "forward":
        return F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1).mean()
    if kind == "reverse":
        return F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1).mean()
    if kind == "l2":
        return (ls - lt).square().mean(-1).mean()
    m = 0.5 * (ls.exp() + lt.exp())
    return 0.5 * (lt.exp() * (lt - m.log())).sum(-1).mean() + 0.5 * (ls.exp() * (ls - m.log())).sum(-1).mean()


@pytest.mark.parametrize(
    "intermediate, kind, strategy",
    [
        ("kld", "forward", "adaptive"),
        ("kld", "reverse", "adaptive"),
        ("kld", "jsd", "bottom_k"),
        ("l2", "forward", "adaptive"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_interaction_step_equals_the_plain_computation(toy, tmp_path, intermediate, kind, strategy, dtype, chunk_size):
    """The step (each teacher target computed once, the candidate scores reused as the matched losses, forward KL
    scored from logsumexp and row dot products and its logits' gradient written out, the head run again chunk by
    chunk in backward; the 9 response tokens in chunks of 3 or in one chunk) against the plain computation it
    replaces: whole logits of every verbalized layer with autograd, the candidates scored pair by pair, the same
    draws: the same matches, loss and gradients, in float64 to 1e-10 and in float32 (as trained on the CPU) to
    float32's rounding."""
    overrides = [f"interact.intermediate_loss={intermediate}", f"interact.divergence={kind}"]
    overrides += [f"chunk_size={chunk_size}", f"interact.match.strategy={strategy}", "interact.match.bottom_k=2"]
    run = _interaction(toy, tmp_path, *overrides)
    step, live = run.step, run.step.teacher
    (s_parts,), s_verb, t_parts, t_verb, vocab = (
        step.s_parts,
        step.verbalizers,
        live.parts,
        live.verbalizers,
        step.vocab,
    )
    step.to(dtype), live.model.to(dtype), t_verb.to(dtype)
    batch = next(iter(run.loader))
    batch = {who: {k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()} for who, b in batch.items()}
    draws = step.generator.get_state()
    loss, logs = step(batch)
    trained = [p for p in step.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trained)

    t_inputs, t_mask, _ = split_batch(batch["teacher"])
    with torch.no_grad(), capture(t_parts.layers, t_verb.target_layers) as t_states:
        t_logits = live.model(**t_inputs, logits_to_keep=t_mask).logits[:, :vocab]
    t_layers = [
        t_verb.head(j, t_parts.norm, t_parts.lm_head, vocab)(t_states[layer][t_mask]).detach()
        for j, layer in enumerate(t_verb.target_layers)
    ]
    s_inputs, s_mask, s_targets = split_batch(batch["student"])
    assert len(step.chunks(len(s_targets))) == {3: 3, 64: 1}[chunk_size]
    with capture(s_parts.layers, s_verb.target_layers) as s_states:
        s_logits = step.student(**s_inputs, logits_to_keep=s_mask).logits[:, :vocab]
    s_layers = [
        s_verb.head(i, s_parts.norm, s_parts.lm_head, vocab)(s_states[layer][s_mask])
        for i, layer in enumerate(s_verb.target_layers)
    ]
    layer_kind = "l2" if intermediate == "l2" else kind
    plain = [[_plain_divergence(s, t, layer_kind) for s in s_layers] for t in t_layers]  # [t_l][t_s]
    scores = torch.stack([torch.stack(row) for row in plain]).detach()
    options = dataclasses.asdict(step.cfg.match)
    match = layer_match(scores, **options, generator=torch.Generator().set_state(draws))
    plain_loss = sum(torch.stack([plain[j][i] for j in chosen]).mean() for i, chosen in enumerate(match))
    plain_loss = plain_loss + _plain_divergence(s_logits, t_logits, kind)

    assert logs["match"] == match
    assert strategy != "bottom_k" or len(match[0]) == 2  # a layer's term is then the mean over two pairs
    loss_tolerance, grad_tolerance = (dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-8, atol=1e-11))
    if dtype == torch.float32:
        loss_tolerance, grad_tolerance = (dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-7))
    torch.testing.assert_close(loss, plain_loss, **loss_tolerance)
    for got, want in zip(grads, torch.autograd.grad(plain_loss, trained), strict=True):
        torch.testing.assert_close(got, want, **grad_tolerance)


def test_interact_step_refuses_a_student_whose_final_norm_trains(toy, tmp_path):
    """The matched divergences send their gradient below the shared final norm and LM head only: a trained one would
    silently get none, so the step refuses it."""
    run = _interaction(toy, tmp_path)
    (s_parts,), step = run.step.s_parts, run.step
    s_parts.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="final norm and LM head must be frozen"):
        interact_stage.InteractStep(step.student, s_parts, step.verbalizers, step.teacher, _cfg(toy), 8, step.generator)
