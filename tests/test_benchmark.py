"""benchmarks/interaction_step.py runs end to end in --tiny mode and reports what docs/PERFORMANCE.md reads."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "interaction_step.py"


def test_tiny_benchmark_reports_every_step(tmp_path):
    out = tmp_path / "tiny.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--teacher-layers", "12", "--repeats", "2", "--warmup", "1"]
    command += ["--on-policy"]
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| vlsi |" in result.stdout and "vlsi over kd time" in result.stdout

    report = json.loads(out.read_text())
    assert report["teacher"]["target_layers"] == [2, 6, 10] and report["student"]["target_layers"] == [2, 6]
    steps = report["steps"]
    assert list(steps) == ["sft", "kd_final", "vlsi", "kd_final_on_policy", "vlsi_on_policy"]
    for step in steps.values():
        assert len(step["ms_all"]) == 2 and step["ms"] > 0 and math.isfinite(step["loss"])
        assert step["floor_ms"] > 0 and 0 <= step["step_gib"] <= step["peak_gib"]  # CPU: peak RSS
    assert steps["sft"]["flops"] < steps["kd_final"]["flops"] < steps["vlsi"]["flops"]
    assert report["vlsi_over_kd_time"] == steps["vlsi"]["ms"] / steps["kd_final"]["ms"]
    for name in ("kd_final", "vlsi"):  # the student samples as many tokens as the fixed response holds
        on_policy = steps[f"{name}_on_policy"]
        assert 0 < on_policy["generate_ms"] < on_policy["ms"] and 0 < on_policy["generate_share"] < 1
        assert 0 < on_policy["generate_cpu_ms"] < on_policy["cpu_ms"] and 0 < on_policy["generate_cpu_share"] < 1
        assert report[f"{name}_on_policy_over_off_policy_time"] == on_policy["ms"] / steps[name]["ms"]
    assert "vlsi_on_policy: sampling" in result.stdout
