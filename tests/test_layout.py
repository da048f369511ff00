"""The package's rooms and the way their imports run (docs/development.md#layout): each room imports only
rooms on a floor below its own, read from the source's import statements (function-level ones included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dino_hf"

# The floors, lowest first; a room imports only rooms on lower floors.
FLOORS = (
    {"models", "command_line"},
    {"data", "augment", "convert"},
    {"objectives", "evaluation", "hub"},
    {"run_files"},
    {"training"},
)
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def imported_rooms(path: Path, root: Path = PACKAGE) -> set[str]:
    """The rooms of dino_hf that the module at `path` (under the package folder `root`) imports."""
    parts = path.relative_to(root).with_suffix("").parts
    package = ["dino_hf", *parts[:-1]]
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                module = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                module = (node.module or "").split(".")
            names = [module] if len(module) > 1 else [[*module, alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        rooms |= {name[1] for name in names if name[0] == "dino_hf" and len(name) > 1}
    return rooms


def room_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py")


def test_every_room_has_a_floor():
    assert {room_of(path) for path in MODULES} == set(FLOOR)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_a_room_imports_only_rooms_below_it(path):
    room = room_of(path)
    above = {other for other in imported_rooms(path) - {room} if FLOOR[other] >= FLOOR[room]}
    assert not above, f"{path.relative_to(PACKAGE)} ({room}, floor {FLOOR[room]}) imports {sorted(above)}"


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    root = tmp_path / "dino_hf"
    module = root / "models" / "example.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "from ..training import trainer\n"
        "import dino_hf.convert.export\n"
        "from dino_hf import hub\n"
        "from .heads import DinoHead\n\n"
        "def f():\n"
        "    from ..run_files.state import RunState\n"
    )
    assert imported_rooms(module, root) == {"training", "convert", "hub", "run_files", "models"}


def test_the_public_names_import_from_the_package():
    import dino_hf

    for name in dino_hf.__all__:
        assert getattr(dino_hf, name) is not None, name


def test_every_subpackage_is_installed():
    """pyproject.toml lists every folder of the package, so that a wheel holds all of it."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(path.parent.relative_to(PACKAGE.parent).parts) for path in PACKAGE.rglob("__init__.py")}
    assert folders <= listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages in pyproject.toml"
