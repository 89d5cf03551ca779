"""The layers are the layout: which package may import which, Ray only in the Ray layer, short functions, and no
module reading another's private names. Read from the source (ast), so a check holds for every line, run or not."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ray_resnet"
# package -> the ray_resnet packages it may import (besides the shared modules config, constants and errors);
# imports only go down: apps -> raytrain -> core -> io
ALLOWED = {
    "apps": {"apps", "raytrain", "core", "io"},
    "raytrain": {"raytrain", "core", "io"},
    "core": {"core", "io"},
    "io": {"io"},
    # the config tree reads and writes config.yaml through io.storage and checks model names with core.models
    "config": {"io", "core"},
    "constants": set(),
    "errors": set(),
}
SHARED = {"config", "constants", "errors", "timm", "__main__", "__init__"}  # modules at the package's top
MAX_LINES, MAX_PARAMS = 50, 7


def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imported(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, nested ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import of {node.module}: the package uses absolute imports"
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_only_the_ray_layer_imports_ray():
    importing = sorted(str(path.relative_to(PACKAGE)) for path, tree in _modules().items()
                       if any(m == "ray" or m.startswith("ray.") for m, _ in _imported(tree)))
    assert importing and all(name.startswith("raytrain/") for name in importing), importing


def test_imports_only_go_down_the_layers():
    wrong = []
    for path, tree in _modules().items():
        layer = _layer(path)
        for module, names in _imported(tree):
            parts = module.split(".")
            if parts[0] != "ray_resnet" or len(parts) < 2:
                continue
            target = parts[1] if parts[1] not in SHARED else None
            if layer in ALLOWED and target and target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_functions_are_short_and_take_few_parameters():
    long = []
    for path, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
                count = sum(1 for a in params if a is not None and a.arg not in ("self", "cls"))
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES or count > MAX_PARAMS:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines} lines, {count} params")
    assert not long, long


def test_no_module_reads_another_modules_private_names():
    reads = []
    for path, tree in _modules().items():
        for module, names in _imported(tree):
            if module.startswith("ray_resnet"):
                reads += [f"{path.relative_to(PACKAGE)}: from {module} import {n}" for n in names if n.startswith("_")]
    assert not reads, reads
