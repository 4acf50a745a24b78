"""The layers of vlsi: a module imports only from its own layer or the ones below it, so a change low down never
needs what is built on it (README.md#layout). A new module must be given its layer here."""

import ast
from functools import cache
from pathlib import Path

import vlsi

# Lowest first. A module belongs to the longest prefix listed.
LAYERS = [
    ("vlsi", "vlsi.runfolder", "vlsi.config", "vlsi.plots"),  # run folders, settings
    ("vlsi.data",),  # records -> samples -> encoded batches
    ("vlsi.models", "vlsi.card", "vlsi.toy"),  # what a model is, how it loads and saves, its card
    ("vlsi.losses", "vlsi.matching"),  # the method's maths
    ("vlsi.distributed",),  # how a launch places models and gathers weights
    ("vlsi.eval", "vlsi.explain"),  # generation, benchmarks, per-layer decoding
    ("vlsi.cache", "vlsi.answers", "vlsi.served"),  # the teacher's answers and cached targets
    ("vlsi.stages",),  # verbalize, interact, sft and what they share
    ("vlsi.preflight",),  # every check made before a stage trains
    ("vlsi.pipeline",),  # `vlsi train`: the stages in order
    ("vlsi.demo",),  # experiments built on the pipeline
    ("vlsi.cli", "vlsi.__main__"),
]
SOURCE = Path(vlsi.__file__).parent


def layer(module: str) -> int:
    prefixes = [(len(p), i) for i, group in enumerate(LAYERS) for p in group if f"{module}.".startswith(f"{p}.")]
    assert prefixes, f"{module} has no layer in tests/test_layers.py: add it to LAYERS"
    return max(prefixes)[1]


@cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = ("vlsi", *path.relative_to(SOURCE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    """The vlsi modules `module` imports, lazy imports inside functions included."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                above = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*above, base] if base else above)
            # `from . import x` / `from vlsi import x`: x may be a module of that package
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names)
    return {n for n in names if n == "vlsi" or n.startswith("vlsi.")}


def test_imports_run_down_the_layers():
    upward = [
        f"{module} (layer {layer(module)}) imports {name} (layer {layer(name)})"
        for module, path in modules().items()
        for name in sorted(imports(module, path))
        if layer(name) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_check_sees_imports():
    """The parser resolves relative, absolute and lazy imports (a broken parser would pass every layering)."""
    found = imports("vlsi.stages.sft", modules()["vlsi.stages.sft"])
    assert {"vlsi.config", "vlsi.stages.loop", "vlsi.models.loading"} <= found
    assert "vlsi.pipeline" in imports("vlsi.cli", modules()["vlsi.cli"])  # imported inside a function
    assert layer("vlsi.data.report") == layer("vlsi.data") < layer("vlsi.models.loading") < layer("vlsi.distributed")
