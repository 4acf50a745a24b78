"""`vlsi` with accelerate's FSDP2 on CPU processes, for tests only. Two stand-ins for what only GPUs get:
accelerate switches FSDP on only for GPU-type launches, so an `accelerate launch --config_file
configs/accelerate/fsdp2.yaml` started with ACCELERATE_USE_CPU=true keeps the FSDP plugin it built from the config
here; and `Accelerator.get_state_dict` (torch's `get_model_state_dict(full_state_dict=True)`) returns CPU DTensors
still sharded, so its result is gathered here into whole tensors, as it is on GPUs. Everything else (sharding,
training, sharded checkpoints, resuming) is vlsi's and accelerate's own code path.

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \\
        tests/fsdp2_on_cpu.py train ...
"""

import sys

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

_init = AcceleratorState.__init__


def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


_get_state_dict = Accelerator.get_state_dict


def _gathered_state_dict(self, model, unwrap=True):
    state = _get_state_dict(self, model, unwrap)
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


AcceleratorState.__init__ = _keep_fsdp_on_cpu
Accelerator.get_state_dict = _gathered_state_dict

if __name__ == "__main__":
    from vlsi.cli import main

    sys.exit(main())
