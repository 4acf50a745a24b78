"""Record the prompts VLMEvalKit builds for the fixture rows in tests/data/prompts/ (expected.json there), by running
VLMEvalKit's own code: each dataset class loads the fixture TSV through its real `__init__` (pandas reading, image
references, `toliststr`) and builds each row's message the way `vlmeval/inference.py` does, with the dataset's
`build_prompt` or, where `Qwen2VLPromptMixin.use_custom_prompt` says so, Qwen2-VL's.

    git clone https://github.com/open-compass/VLMEvalKit && git -C VLMEvalKit checkout e8e78f0
    python scripts/record_vlmevalkit_prompts.py VLMEvalKit

Only the prompt code is exercised, so VLMEvalKit's API clients and other optional dependencies are not installed:
any module that VLMEvalKit's files import and this environment lacks is replaced by an empty stand-in. An image in
a message is recorded as the md5 of its RGB pixels, which tests/test_prompts.py compares with the images vlsi sends.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "data" / "prompts"
# vlsi benchmark -> (fixture file, VLMEvalKit dataset name, class in vlmeval.dataset). MM-Vet v2 and LLaVA-Wilder
# are not VLMEvalKit datasets: they are recorded with the class of their kind (MMVet, LLaVABench).
BENCHMARKS = {
    "ai2d": ("mcq", "AI2D_TEST", "ImageMCQDataset"),
    "blink": ("mcq", "BLINK", "ImageMCQDataset"),
    "mmbench_en": ("mcq", "MMBench_DEV_EN", "ImageMCQDataset"),
    "mmbench_cn": ("mcq", "MMBench_DEV_CN", "ImageMCQDataset"),
    "mmstar": ("mcq", "MMStar", "ImageMCQDataset"),
    "q_bench": ("mcq", "Q-Bench1_VAL", "ImageMCQDataset"),
    "seed_2_plus": ("mcq", "SEEDBench2_Plus", "ImageMCQDataset"),
    "mmmu": ("mmmu", "MMMU_DEV_VAL", "MMMUDataset"),
    "cv_bench_2d": ("cv_bench", "CV-Bench-2D", "CVBench"),
    "cv_bench_3d": ("cv_bench", "CV-Bench-3D", "CVBench"),
    "pope": ("yes_no", "POPE", "ImageYORNDataset"),
    "hallusionbench": ("yes_no", "HallusionBench", "ImageYORNDataset"),
    "mme": ("yes_no", "MME", "ImageYORNDataset"),
    "chartqa": ("vqa", "ChartQA_TEST", "ImageVQADataset"),
    "mathvista": ("vqa", "MathVista_MINI", "MathVista"),
    "mm_vet": ("vqa", "MMVet", "MMVet"),
    "llava_wilder": ("vqa", "LLaVABench", "LLaVABench"),
}


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for what VLMEvalKit's own files import and is not installed (nothing else is touched)."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, name, path, target=None):
        frame = sys._getframe(1)
        while frame is not None and ("importlib" in frame.f_code.co_filename or frame.f_code.co_filename[0] == "<"):
            frame = frame.f_back
        if frame is None or not frame.f_code.co_filename.startswith(self.root) or name in sys.stdlib_module_names:
            return None
        for finder in sys.meta_path:
            if finder is not self and finder.find_spec(name, path, target) is not None:
                return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__ = [], spec
        return module

    def exec_module(self, module):
        pass


def _message(struct: list[dict]) -> list[dict]:
    def pixels(path: str) -> str:
        with Image.open(path) as image:
            return hashlib.md5(image.convert("RGB").tobytes()).hexdigest()

    return [{"type": s["type"], "value": pixels(s["value"]) if s["type"] == "image" else s["value"]} for s in struct]


def main(vlmevalkit: Path) -> None:
    root = str(vlmevalkit.resolve())
    sys.meta_path.append(_StandIns(root))
    sys.path.insert(0, root)
    os.environ["LMUData"] = tempfile.mkdtemp()
    import pandas as pd
    import vlmeval.dataset as datasets
    from vlmeval.vlm.qwen2_vl.prompt import Qwen2VLPromptMixin

    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    expected = {"vlmevalkit_commit": commit, "benchmarks": {}}
    for benchmark, (fixture, name, class_name) in BENCHMARKS.items():
        cls = getattr(datasets, class_name)
        # The fixture stands in for the downloaded TSV, read as vlmeval.smp.load reads a .tsv; everything after
        # loading is VLMEvalKit's __init__.
        tsv = FIXTURES / f"{fixture}.tsv"
        dataset = type(class_name, (cls,), {"load_data": lambda self, _, tsv=tsv: pd.read_csv(tsv, sep="\t")})
        data = dataset(dataset=name)
        qwen2_vl = Qwen2VLPromptMixin.__new__(Qwen2VLPromptMixin)
        qwen2_vl._use_custom_prompt = True  # vlmeval/config.py: Qwen2-VL-*-Instruct (Qwen2.5-VL sets False)
        qwen2_vl.set_dump_image(data.dump_image)
        rows = [data.data.iloc[i] for i in range(len(data.data))]
        custom = qwen2_vl.use_custom_prompt(name)
        expected["benchmarks"][benchmark] = {
            "fixture": f"{fixture}.tsv",
            "dataset": name,
            "index": [str(row["index"]) for row in rows],
            "dataset_prompt": [_message(data.build_prompt(row)) for row in rows],
            "qwen2_vl_prompt": [_message(qwen2_vl.build_prompt(row, dataset=name)) for row in rows] if custom else None,
        }
    (FIXTURES / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
