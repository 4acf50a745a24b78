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
from ..distributed import chunk_agreement, load_frozen, prepare_frozen
from ..losses import chunked_cross_entropy, shared_vocab_size
from ..models.family import Parts, capture, model_parts
from ..models.loading import compute_dtype, load_processor
from ..models.verbalizer import Verbalizers
from .common import (
    atomic_dir,
    build_loader,
    checkpointing,
    drop_checkpoints,
    load_samples,
    split_batch,
    substate,
    target_layers,
    tracking,
)
from .loop import MetricsLog, make_accelerator, train


class VerbalizeStep(nn.Module):
    """Registered: the verbalizers only. The frozen model runs without autograd."""

    def __init__(
        self, model: nn.Module, parts: Parts, verbalizers: Verbalizers, vocab: int, chunk_size: int, min_chunks=None
    ):
        super().__init__()
        self.verbalizers = verbalizers
        self.frozen = (model, parts)  # a tuple keeps the backbone out of .parameters() and DDP
        self.vocab = vocab
        self.chunk_size = chunk_size
        self.min_chunks = min_chunks or (lambda n: 0)  # `chunk_agreement`: equal head calls on every process

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        model, parts = self.frozen
        inputs, mask, targets = split_batch(batch["model"])
        layers = self.verbalizers.target_layers
        with torch.no_grad(), capture(parts.layers, layers) as states:
            model(**inputs, logits_to_keep=1)  # hidden states only: skip the LM head on every position
        min_chunks = self.min_chunks(len(targets))
        losses = [
            chunked_cross_entropy(
                states[layer][mask],  # [N, d]
                self.verbalizers.head(k, parts.norm, parts.lm_head, self.vocab),
                targets,
                self.chunk_size,
                min_chunks,
            )
            for k, layer in enumerate(layers)
        ]
        logs = {f"loss/layer{layer}": loss.item() for layer, loss in zip(layers, losses)}
        return torch.stack(losses).sum(), logs


def verbalize(cfg: TrainConfig, model_path: str, who: str, output: Path, metrics: MetricsLog, samples=None) -> Path:
    """Train verbalizers for one model (`who` = teacher | student) and save them to `output`."""
    stage = cfg.verbalize
    dtype = compute_dtype(cfg.precision)
    accelerator = make_accelerator(stage, dtype, **tracking(cfg))
    processor = load_processor(model_path, cfg.trust_remote_code)
    model = load_frozen(accelerator, model_path, dtype, cfg.trust_remote_code)
    parts = model_parts(model)
    layers = target_layers(cfg, parts, who)
    torch.manual_seed(cfg.seed)
    verbalizers = Verbalizers(parts.hidden_size, layers, cfg.verbalizer.residual, parts.family)
    vocab = shared_vocab_size(len(processor.tokenizer), parts.vocab_rows)
    model, parts = prepare_frozen(accelerator, model, parts)
    step = VerbalizeStep(model, parts, verbalizers, vocab, cfg.chunk_size, chunk_agreement(accelerator, cfg.chunk_size))
    samples = samples if samples is not None else load_samples(cfg)
    loader = build_loader(cfg, samples, {"model": processor}, stage.batch_size, cfg.seed, f"verbalize-{who}")
    name = f"verbalize/{who}"
    state = train(accelerator, step, loader, stage, name, metrics, **checkpointing(cfg, name))
    if accelerator.is_main_process:
        trained = Verbalizers(parts.hidden_size, layers, cfg.verbalizer.residual, parts.family)
        trained.load_state_dict(substate(state, "verbalizers"))
        with atomic_dir(output) as tmp:
            trained.save(tmp, model=model_path, num_layers=parts.num_layers, vocab=vocab)
        drop_checkpoints(cfg, name)
    accelerator.wait_for_everyone()
    return output
