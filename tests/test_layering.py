"""The import layers of docs/architecture.md: a module imports only from its own room or from
rooms in lower layers, so the data flow stays one-way. Every import counts: module-level and
inside functions, `import logix.x`, each name of `from logix import a, b`, relative imports, and
the `integrations/` folder (installed as `logix.integrations`)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"logix": ROOT / "logix", "logix.integrations": ROOT / "integrations"}

LAYERS = [
    {"errors"},
    {"config", "distributed", "progress", "logra", "mode"},
    {"storage"},
    {"log", "statistics"},
    {"tracking", "influence", "evaluation", "planning", "summary"},
    {"dashboard", "compat"},  # dashboard shows evaluation results; compat: older names
    {"index", "text", "scheduler"},
    {"run", "export"},
    {"__init__"},  # logix.init, get_run: what the tools and integrations drive
    {"integrations"},
    {"build"},  # logix build / score: drive a Run over a dataset, with the integrations' passes
    {"cli"},
    {"huggingface", "lightning"},  # old LogIX's module names, aliases of the integrations
]
LAYER = {room: n for n, rooms in enumerate(LAYERS) for room in rooms}

def modules():
    """(dotted name, path) of every module of the installed package."""
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([package, *parts]), path


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_room(name: str) -> bool:
    return (ROOT / "logix" / f"{name}.py").is_file() or (ROOT / "logix" / name).is_dir() \
        or name == "integrations"


def targets(node, module: str, path: pathlib.Path):
    """The logix modules an import statement reads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "logix"]
    base = node.module or ""
    if node.level:  # relative: from the module's own package
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "logix":
        return []
    if base == "logix":  # `from logix import a, b`: each name is a room or a name of __init__
        return [f"logix.{a.name}" if is_room(a.name) else "logix" for a in node.names]
    return [base]


def imports():
    """(room, target room, where) of every import of a logix module."""
    for module, path in modules():
        room = room_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in targets(node, module, path):
                    yield room, room_of(target), f"{path.relative_to(ROOT)}:{node.lineno}: {target}"


def test_every_room_has_a_layer():
    rooms = {room_of(module) for module, _ in modules()}
    assert rooms == set(LAYER), (sorted(rooms - set(LAYER)), sorted(set(LAYER) - rooms))


def test_the_scan_sees_every_kind_of_import():
    found = {where.split(": ")[1] for _, _, where in imports()}
    assert {"logix.integrations._common", "logix.evaluation.lds", "logix.distributed",
            "logix.logra", "logix"} <= found


def test_imports_point_down_the_layers():
    wrong = [where for room, target, where in imports()
             if target != room and LAYER[target] >= LAYER[room]]
    assert not wrong, wrong


def test_influence_never_imports_index():
    assert not [where for room, target, where in imports()
                if room == "influence" and target == "index"]
