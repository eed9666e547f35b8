"""The package's layers, read from its imports: nothing imports a layer above its own, no cycles.

CLIs (train, evaluate, predict, export, plan; the napari plugin) -> engine -> models -> blocks -> kernels;
data, metrics and utils are leaves (data may use utils).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bionet_fast"
KERNELS = ROOT / "kernels"
# layer rank: a module may import only modules of a lower rank, or of its own layer
RANK = {"utils": 0, "metrics": 0, "data": 1, "kernels": 1, "blocks": 2, "models": 3, "engine": 4, "cli": 5}
ALLOWED_SAME = {"utils", "data", "kernels", "blocks", "models", "engine", "cli"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "bionet_fast":
        return ""
    if len(parts) == 1:
        return "root"
    head = parts[1]
    if head in RANK:
        return head
    return "cli"  # train, evaluate, predict, export, plan, _cli, napari (the plugin package)


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = ["bionet_fast", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    for path in KERNELS.glob("*.py"):
        name = "bionet_fast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        mods[name] = path
    return mods


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bionet_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = base[: len(base) - node.level + 1]
                name = ".".join(target + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("bionet_fast"):
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) not in ("root",)))
def test_no_module_imports_a_layer_above_its_own(module):
    mine = _layer(module)
    for imported in _imports(module, MODULES[module]):
        target = _resolve(imported)
        if target is None or target == module:
            continue
        theirs = _layer(target)
        if theirs == "root":
            pytest.fail(f"{module} imports the package root (bionet_fast): import from its layer instead")
        assert RANK[theirs] < RANK[mine] or (theirs == mine and mine in ALLOWED_SAME), \
            f"{module} (layer {mine}) imports {target} (layer {theirs})"


def test_no_import_cycles():
    graph = {m: {t for i in _imports(m, p) if (t := _resolve(i)) and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            elif state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


# engine's sub-packages, one job each: training may use prediction (validation) and planning; prediction
# and planning use neither each other nor training; the engine's own modules (threads, precision, CUDA
# graphs, locks, the run folder's layout) use no sub-package.
ENGINE_SUBS = {"training": {"prediction", "planning"}, "prediction": set(), "planning": set(), "": set()}


def _engine_sub(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["bionet_fast", "engine"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in ENGINE_SUBS and len(parts) > 3 or (PKG / "engine" / parts[2]).is_dir() else ""


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _engine_sub(m) is not None))
def test_engine_sub_packages_keep_to_their_job(module):
    mine = _engine_sub(module)
    for imported in _imports(module, MODULES[module]):
        target = _resolve(imported)
        theirs = _engine_sub(target) if target else None
        if not theirs or theirs == mine:
            continue
        assert theirs in ENGINE_SUBS[mine], f"{module} (engine.{mine or '*'}) imports {target} (engine.{theirs})"


def test_engine_is_three_jobs():
    subs = {p.name for p in (PKG / "engine").iterdir() if (p / "__init__.py").is_file()}
    assert subs == {"training", "prediction", "planning"}
    assert len(list((PKG / "engine").glob("*.py"))) <= 6  # the shared modules only


def test_layers_are_folders():
    for folder in ("models", "blocks", "data", "engine", "utils"):
        assert (PKG / folder / "__init__.py").is_file()


def test_every_internal_import_names_a_real_module():
    """Catches a lazy import left pointing at a module's old place (it fails only when run)."""
    for module, path in MODULES.items():
        is_pkg = path.name == "__init__.py"
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("bionet_fast"):
                    assert target in MODULES, f"{module} line {node.lineno}: no module {target}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("bionet_fast"):
                        assert alias.name in MODULES, f"{module} line {node.lineno}: no module {alias.name}"
