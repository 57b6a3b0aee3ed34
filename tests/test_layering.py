"""The import layers of docs/architecture.md: a module imports (at module level) only from its
own room or from rooms in lower layers, so the data flow stays one-way."""

import ast
import pathlib

LOGIX = pathlib.Path(__file__).resolve().parent.parent / "logix"

LAYERS = [
    {"errors"},
    {"config", "distributed", "progress", "logra"},
    {"storage"},
    {"log", "statistics"},
    {"tracking", "influence", "evaluation", "dashboard", "planning"},
    {"index", "text", "scheduler"},
    {"run", "summary", "export"},
    {"__init__", "cli", "integrations"},
    {"huggingface", "lightning"},  # old LogIX's module names, aliases of the integrations
]
LAYER = {room: n for n, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_room_has_a_layer():
    rooms = {p.stem if p.parent == LOGIX else p.relative_to(LOGIX).parts[0]
             for p in LOGIX.rglob("*.py")}
    assert rooms <= set(LAYER), sorted(rooms - set(LAYER))


def test_imports_point_down_the_layers():
    upward = []
    for path in LOGIX.rglob("*.py"):
        rel = path.relative_to(LOGIX)
        room = rel.parts[0] if len(rel.parts) > 1 else path.stem
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] == "logix"):
                continue
            target = room_of(node.module)
            if target == "__init__":  # `from logix import x`: x is the room
                target = node.names[0].name
            if target != room and LAYER[target] >= LAYER[room]:
                upward.append(f"{rel}: from {node.module} import ...")
    assert not upward, upward
