"""Stage 1, verbalization (docs/METHOD.md#stage-1-verbalize): teach each target layer to speak.

The backbone, its final norm and LM head are frozen; only the verb-FFNs train, with next-token cross-entropy
on the response tokens at every target layer, summed over layers. Teacher and student are independent runs.

    vlsi verbalize --model DIR --data train.json --output OUT [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..data import split_batch
from ..distributed import ChunkPlan, chunk_plan, load_frozen, prepare_frozen
from ..losses import chunked_cross_entropy, shared_vocab_size
from ..models.family import Parts, capture, model_parts
from ..models.loading import compute_dtype, load_processor
from ..models.verbalizer import Verbalizers, target_layers
from .loop import MetricsLog, Run, checkpointing, make_accelerator, tracking, train
from .output import save_verbalizers, write_output
from .samples import build_loader, load_samples


class VerbalizeStep(nn.Module):
    """Registered: the verbalizers only. The frozen model runs without autograd."""

    def __init__(self, model: nn.Module, parts: Parts, verbalizers: Verbalizers, vocab: int, chunks: ChunkPlan):
        super().__init__()
        self.verbalizers = verbalizers
        self.frozen = (model, parts)  # a tuple keeps the backbone out of .parameters() and DDP
        self.vocab = vocab
        self.chunks = chunks  # response tokens -> the row ranges of the chunked losses (`distributed.chunk_plan`)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        model, parts = self.frozen
        inputs, mask, targets = split_batch(batch["model"])
        layers = self.verbalizers.target_layers
        with torch.no_grad(), capture(parts.layers, layers) as states:
            model(**inputs, logits_to_keep=1)  # hidden states only: skip the LM head on every position
        chunks = self.chunks(len(targets))
        losses = [
            chunked_cross_entropy(
                states[layer][mask],  # [N, d]
                self.verbalizers.head(k, parts.norm, parts.lm_head, self.vocab),
                targets,
                chunks,
            )
            for k, layer in enumerate(layers)
        ]
        logs = {f"loss/layer{layer}": loss.item() for layer, loss in zip(layers, losses)}
        return torch.stack(losses).sum(), logs


def setup(cfg: TrainConfig, model_path: str, who: str, samples=None) -> Run:
    """The model (frozen, placed as the launch distributes training), fresh verbalizers for its target layers
    (verbalizer.`who`_layers), the step module and the data loader."""
    dtype = compute_dtype(cfg.precision)
    accelerator = make_accelerator(cfg.verbalize, dtype, **tracking(cfg))
    processor = load_processor(model_path, cfg.trust_remote_code)
    model = load_frozen(accelerator, model_path, dtype, cfg.trust_remote_code)
    parts = model_parts(model)
    torch.manual_seed(cfg.seed)
    verbalizers = Verbalizers(parts.hidden_size, target_layers(cfg, parts, who), cfg.verbalizer.residual, parts.family)
    vocab = shared_vocab_size(len(processor.tokenizer), parts.vocab_rows)
    model, parts = prepare_frozen(accelerator, model, parts)
    step = VerbalizeStep(model, parts, verbalizers, vocab, chunk_plan(accelerator, cfg.chunk_size))
    samples = samples if samples is not None else load_samples(cfg)
    loader = build_loader(cfg, samples, {"model": processor}, cfg.verbalize.batch_size, cfg.seed, f"verbalize-{who}")
    return Run(accelerator, step, loader, dtype, processor)


def save(cfg: TrainConfig, model_path: str, output: Path, run: Run, state: dict | None, name: str) -> Path:
    """The trained verbalizers in `output`."""
    step = run.step
    _, parts = step.frozen
    meta = dict(model=model_path, num_layers=parts.num_layers, vocab=step.vocab)
    return write_output(cfg, run, name, output, lambda tmp: save_verbalizers(step.verbalizers, state, tmp, **meta))


def verbalize(cfg: TrainConfig, model_path: str, who: str, output: Path, metrics: MetricsLog, samples=None) -> Path:
    """Train verbalizers for one model (`who` = teacher | student) and save them to `output`."""
    name = f"verbalize/{who}"
    run = setup(cfg, model_path, who, samples)
    state = train(run.accelerator, run.step, run.loader, cfg.verbalize, name, metrics, **checkpointing(cfg, name))
    return save(cfg, model_path, output, run, state, name)
