"""`vlsi` with accelerate's DeepSpeed integration on CPU processes, for tests only. accelerate switches DeepSpeed on
only for GPU-type launches: an `accelerate launch --config_file configs/accelerate/zero3.yaml` started with
ACCELERATE_USE_CPU=true sets up torch.distributed on gloo and then drops the DeepSpeed plugin it built from the
config; here the plugin is kept. DeepSpeed itself runs on the CPU (its CPU accelerator, gloo collectives), so
everything else (ZeRO partitioning, the ZeRO-3 inference engine of the frozen teacher, gathering the trained
weights, checkpoints) is vlsi's, accelerate's and DeepSpeed's own code path; ZeRO-3 partitions every trained
weight, however small. For the tests to see what ran, every
DeepSpeed engine is announced on stderr with its ZeRO stage, whether its model arrived already partitioned, and where
ZeRO-3 offloads its parameters.

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 2 \\
        tests/deepspeed_on_cpu.py train ...
"""

import sys

import deepspeed
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _keep_deepspeed_on_cpu(self, *args, deepspeed_plugin=None, **kwargs):
    _init(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if deepspeed_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
        self._mixed_precision = "no"  # DeepSpeed's own config carries the precision
        # ZeRO-3 keeps weights under 100k elements whole on every process, which would be all of a tiny test model's:
        # partition every weight, as a real model's are.
        deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate records it


_initialize = deepspeed.initialize


def _announce(*args, model=None, **kwargs):
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    engine, *rest = _initialize(*args, model=model, **kwargs)
    stage = engine.zero_optimization_stage()
    line = f"deepspeed_on_cpu: ZeRO-{stage} engine, model arrived {'partitioned' if partitioned else 'whole'}"
    offload = engine.zero_offload_param() if stage == 3 else None
    device = getattr(offload.device, "value", offload.device) if offload is not None else "none"  # an enum or a str
    if device != "none":
        line += f", parameters offloaded to {device}"
    sys.stderr.write(line + "\n")  # one write: the processes share stderr
    sys.stderr.flush()
    return (engine, *rest)


AcceleratorState.__init__ = _keep_deepspeed_on_cpu
deepspeed.initialize = _announce

if __name__ == "__main__":
    from vlsi.cli import main

    sys.exit(main())
