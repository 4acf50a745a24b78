"""Run under `torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=true (tests/test_resume.py): three DDP steps of a
one-weight model whose loss is NaN on process 1 only, at its second micro-step. Writes `weight-rank{r}.json`; the
main process also writes the metrics."""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from vlsi.config import StageConfig
from vlsi.stages.loop import MetricsLog, make_accelerator, train


class NaNOnOneProcess(torch.nn.Module):
    def __init__(self, rank: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.rank, self.calls = rank, 0

    def forward(self, batch):
        self.calls += 1
        loss = (self.weight * batch).sum() ** 2
        return (loss * float("nan") if (self.rank, self.calls) == (1, 2) else loss), {}


def main(out: Path) -> None:
    stage = StageConfig(max_steps=3, grad_accum=1, lr=0.1)
    accelerator = make_accelerator(stage, torch.float32)
    rank = PartialState().process_index
    loader = torch.utils.data.DataLoader(torch.randn(12, 3, generator=torch.Generator().manual_seed(0)), batch_size=2)
    state = train(accelerator, NaNOnOneProcess(rank), loader, stage, "sft", MetricsLog(out / "metrics.jsonl"))
    (out / f"weight-rank{rank}.json").write_text(json.dumps(state["weight"].tolist()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
