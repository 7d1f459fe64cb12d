"""The import graph of the package: no cycles, no upward arrows, Lightning and the process group in their modules.

The layers are those of ``docs/architecture.md``; a module may import its own layer or lower ones.
Only module-level imports count (``if TYPE_CHECKING:`` blocks are skipped: they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ckpt"

_MECHANISM = """pipeline saves collective assembly agree mirror upload transfer writer fastwrite reader file_reads
commit targets stale checkpoint rotation discovery staging lock inflight hooks sharded preemption inplace into
export export_source export_ckpt export_safetensors incremental"""
_PURE = "layout naming manifest tree checksum stats redact errors _faults plan policies interval chunks"
LAYERS: dict[str, int] = {  # 5: Lightning-facing ... 1: pure (the layers of docs/architecture.md)
    **dict.fromkeys("callback plugin _lightning demo __init__ __main__ strategies fabric_strategies".split(), 5),
    **dict.fromkeys("options _checks trigger catalog session resume".split(), 4),
    **dict.fromkeys(_MECHANISM.split(), 3),
    **dict.fromkeys("storage locations localfs dist".split(), 2),
    **dict.fromkeys(_PURE.split(), 1),
}
LIGHTNING_IMPORTERS = {"callback", "plugin", "_lightning", "demo", "strategies", "fabric_strategies"}


def _module_level_imports(path: Path) -> list[str]:
    """Absolute module names imported at module level (outside ``if TYPE_CHECKING:``)."""
    names: list[str] = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            if node.module == "lightning_ckpt":
                names += [f"lightning_ckpt.{alias.name}" for alias in node.names]
    return names


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        imported = _module_level_imports(path)
        graph[path.stem] = {n.split(".")[1] for n in imported if n.startswith("lightning_ckpt.")} - {path.stem}
        graph[path.stem] |= {"<lightning>"} if any(n.split(".")[0] == "lightning" for n in imported) else set()
    return graph


def test_every_module_has_a_layer_and_a_docstring() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - set(LAYERS) == set(), "add new modules to LAYERS and docs/architecture.md"
    for path in PACKAGE.glob("*.py"):
        if path.stem not in ("__main__",):
            assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{path.name} has no docstring"


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]})"
        for module, targets in _graph().items()
        for target in targets
        if target in LAYERS and LAYERS[target] > LAYERS[module]
    ]
    assert not upward, upward


def test_the_import_graph_has_no_cycles() -> None:
    graph = {m: {t for t in ts if t in LAYERS} for m, ts in _graph().items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*trail, module, target])}"
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_only_the_lightning_facing_modules_import_lightning() -> None:
    importers = {m for m, targets in _graph().items() if "<lightning>" in targets}
    assert importers <= LIGHTNING_IMPORTERS, importers - LIGHTNING_IMPORTERS
