#!/usr/bin/env bash
# Everything a GPU session should measure, in one call (docs/PERFORMANCE.md), within a 10-minute command limit:
#
#     bash benchmarks/gpu_session.sh OUT [PART ...]     # OUT: where logs and JSON go; PARTs: default all
#
# All parts' limits add up to more than one 10-minute device call when vlsi must be installed first: on a fresh
# machine run `env tests train bench-7b` in one call and `bench-lora bench-80` in the next (the machine stays warm
# for a while between calls).
#
# Each part has its own time limit and writes its log and JSON as soon as it ends, so a part that runs out of
# time or memory loses only itself. Parts, cheapest first:
#   env          nvidia-smi, torch / CUDA versions, the bf16 matmul rate
#   tests        the test suite's GPU-relevant parts (losses, stages, explain) on this machine
#   train        `vlsi train` on the tiny toy pair on the GPU in bf16 (the whole pipeline, precision=auto)
#   bench-7b     benchmarks/interaction_step.py: 2B-sized student, 7B-sized teacher, batch 4 x 2048 tokens
#   bench-lora   the same with the trainer's default LoRA r=64 student
#   bench-80     the 80-layer teacher with 20 target layers (goal: fits an 80 GB card)
set -uo pipefail
OUT_DIR=${1:?usage: gpu_session.sh OUT [PART ...]}
shift
PARTS=${*:-env tests train bench-7b bench-lora bench-80}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."

part() {  # part NAME SECONDS COMMAND...: run it if NAME was asked for
    local name=$1 limit=$2
    shift 2
    [[ " $PARTS " == *" $name "* || $name == install ]] || return 0
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT_DIR/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - start))s" | tee -a "$OUT_DIR/summary.txt"
    tail -n 25 "$OUT_DIR/$name.log"
}

part env 30 bash -c 'nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"'
if ! python -c "import vlsi" 2>/dev/null; then
    part install 200 pip install -e ".[dev]"
fi
part tests 100 python -m pytest -q -x tests/test_losses.py tests/test_stages.py tests/test_explain.py
part train 60 bash -c "python -m vlsi.toy '$OUT_DIR/toy' && vlsi train --teacher '$OUT_DIR/toy/teacher' \
    --student '$OUT_DIR/toy/student' --data '$OUT_DIR/toy/train.json' --output '$OUT_DIR/toy/run' \
    --config configs/tiny-cpu.yaml precision=auto"
part bench-7b 240 python benchmarks/interaction_step.py --out "$OUT_DIR/interaction-7b-teacher.json"
part bench-lora 240 python benchmarks/interaction_step.py --lora 64 --out "$OUT_DIR/interaction-lora64.json"
part bench-80 300 python benchmarks/interaction_step.py --teacher-layers 80 --out "$OUT_DIR/interaction-80-layer-teacher.json"
echo "logs and JSON in $OUT_DIR"
