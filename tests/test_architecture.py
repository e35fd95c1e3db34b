"""The layering of ARCHITECTURE.md, checked from the package's import statements (also inside functions)."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sd_plugin"

# The layers are the package's folders, lowest first (ARCHITECTURE.md): a module imports only from its
# own folder or a lower one. ``cli/`` holds the commands, above all; ``__main__`` runs them.
FOLDER_LAYERS = ["utils", "core", "storage", "evaluation", "hub", "integrations", "cli"]
COMMANDS_LAYER = FOLDER_LAYERS.index("cli")
# The two front-ends in integrations/ and their modules: neither imports the other's.
FRONT_ENDS = {
    "trainer": {"sd_plugin.integrations.trainer", "sd_plugin.integrations.config"},
    "loop": {
        "sd_plugin.integrations.loop",
        "sd_plugin.integrations.recipe_arguments",
        "sd_plugin.integrations.recipe_checkpoints",
        "sd_plugin.integrations.recipe_model",
    },
}


def layer(unit_name: str) -> int:
    """A unit's layer: its folder's place in ``FOLDER_LAYERS``; ``__main__`` runs the commands."""
    return FOLDER_LAYERS.index(unit_name) if unit_name in FOLDER_LAYERS else COMMANDS_LAYER


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str | None = None) -> list[tuple[str, list[str]]]:
    """``(imported sd_plugin module, imported names)`` for every import statement of a module."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sd_plugin":
                continue
            for alias in node.names:  # `from . import checkpoint` imports the module sd_plugin.storage.checkpoint
                submodule = PACKAGE.parent.joinpath(*target.split("."), alias.name)
                if submodule.with_suffix(".py").is_file() or (submodule / "__init__.py").is_file():
                    found.append((f"{target}.{alias.name}", []))
                else:
                    found.append((target, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "sd_plugin"]
    return found


def unit(module: str) -> str | None:
    """The layer unit of a module: its folder (or top-level module) under sd_plugin; None for the facade."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@functools.cache
def _graph(stamp: tuple) -> dict[str, list[tuple[str, list[str]]]]:
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def graph() -> dict[str, list[tuple[str, list[str]]]]:
    """Every module's imports; parsed once per state of the files (it was parsed once per lookup)."""
    return _graph(tuple((str(p), p.stat().st_mtime_ns) for p in sorted(PACKAGE.rglob("*.py"))))


def test_every_module_lives_in_a_layer_folder():
    """Only the facade and ``__main__`` sit at the top; every other module is in one of the layer folders."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top == ["__main__"], f"move these modules into a layer folder ({FOLDER_LAYERS}): {top}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders == sorted(FOLDER_LAYERS), (
        f"give these folders a layer in FOLDER_LAYERS and ARCHITECTURE.md: {folders}"
    )


def test_architecture_md_lists_the_folders_in_layer_order():
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    positions = [text.index(f"`{folder}/`") for folder in FOLDER_LAYERS]
    assert positions == sorted(positions), "ARCHITECTURE.md's table must list the folders lowest layer first"


def architecture_rows() -> dict[str, str]:
    """ARCHITECTURE.md's layer table: folder -> its Modules cell."""
    rows = {}
    for line in (PACKAGE.parent / "ARCHITECTURE.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[1].startswith("`") and cells[1].endswith("/`"):
            rows[cells[1].strip("`/")] = cells[2]
    return rows


def test_architecture_md_lists_every_module_in_its_folders_row():
    """A module missing from ARCHITECTURE.md (or listed there but gone) fails here."""
    rows = architecture_rows()
    assert sorted(rows) == sorted(FOLDER_LAYERS), f"ARCHITECTURE.md's table rows: {sorted(rows)}"
    problems = []
    for folder, cell in rows.items():
        listed = {name.strip().strip("`") for name in cell.replace(";", ",").split(",") if name.strip()}
        present = {p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__"}
        problems += [f"{folder}/{name}.py is not in ARCHITECTURE.md" for name in sorted(present - listed)]
        problems += [f"ARCHITECTURE.md lists {folder}/{name}, which is not there" for name in sorted(listed - present)]
    assert not problems, "\n".join(problems)


def strings_importing_package_modules(source: str) -> list[int]:
    """Lines where a module of the package is imported by name from a string: ``import_module`` /
    ``__import__`` of a literal ``sd_plugin...`` or relative name, or of any value in a module that holds a
    string table of package modules (``"sd_plugin.x.y"``, ``"sd_plugin.x:main"``)."""
    tree = ast.parse(source)
    named = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"sd_plugin(\.\w+)+(:\w+)?", node.value)
    ]
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) not in (
                "import_module",
                "__import__",
            ):
                continue
            first = node.args[0]
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if (literal and first.value.startswith(("sd_plugin", "."))) or (not literal and named):
                lines.append(node.lineno)
    return lines


def test_no_module_is_imported_by_name_from_a_string():
    """Commands and modules are imported plainly, so this test and any import graph see them."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line in strings_importing_package_modules(path.read_text())
    ]
    assert not found, "import these modules plainly: " + ", ".join(found)
    old_command_table = (  # what __main__ did before the commands moved to cli/: the check catches it
        'COMMANDS = {"demo": "sd_plugin.demo", "export": "sd_plugin.hub.cli:export_main"}\n'
        "def main(name):\n"
        "    import importlib\n"
        "    return importlib.import_module(COMMANDS[name].partition(':')[0])\n"
    )
    assert strings_importing_package_modules(old_command_table) == [4]
    assert strings_importing_package_modules("import importlib\nimportlib.import_module('.cli', 'sd_plugin')\n")
    assert not strings_importing_package_modules("import importlib\nfor m in ('httpx',): importlib.import_module(m)\n")


def test_imports_point_down_the_layers():
    wrong = []
    for module, imports in graph().items():
        source = unit(module)
        for target, names in imports:
            if source is None:
                continue  # the facade re-exports every layer
            target_unit = unit(target)
            if target_unit is None:
                wrong.append(f"{module} imports the package facade ({names}); import the module that defines them")
            elif layer(target_unit) > layer(source):
                wrong.append(f"{module} (layer {layer(source)}) imports {target} (layer {layer(target_unit)})")
            elif source in FOLDER_LAYERS and target_unit not in FOLDER_LAYERS:
                wrong.append(f"{module} imports the command {target}")
    assert not wrong, "\n".join(wrong)


def test_front_ends_never_import_each_other():
    integrations = {m for m in graph() if unit(m) == "integrations" and m != "sd_plugin.integrations"}
    assert integrations == set().union(*FRONT_ENDS.values()), "give each integrations module a front-end"
    for name, modules in FRONT_ENDS.items():
        others = set().union(*(m for other, m in FRONT_ENDS.items() if other != name))
        for module in modules:
            crossing = [t for t, _ in graph()[module] if t in others]
            assert not crossing, f"{module} (the {name}) imports {crossing}"
    for module, imports in graph().items():
        if unit(module) in ("hub", "evaluation"):
            front = [t for t, _ in imports if unit(t) == "integrations"]
            assert not front, f"{module} imports the front-end {front}"


def test_no_cycles_between_modules():
    modules = graph()
    edges = {m: {t for t, _ in imports if t in modules and t != m} for m, imports in modules.items()}
    edges = {m: targets for m, targets in edges.items() if unit(m) is not None}  # not the facades
    for m in list(edges):
        if m.count(".") == 1 and (PACKAGE / m.split(".")[1] / "__init__.py").exists():
            edges.pop(m)  # subpackage facades
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in edges.get(node, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, target]))
            if target not in state:
                visit(target, [*path, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_no_private_name_crosses_a_module_boundary():
    crossing = [
        f"{module} imports {name} from {target}"
        for module, imports in graph().items()
        for target, names in imports
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not crossing, "\n".join(crossing)


def test_the_checker_sees_a_violation(tmp_path):
    """The graph reader resolves relative imports, also inside functions (so the tests above can fail)."""
    path = PACKAGE / "cli" / "evaluate.py"
    targets = [target for target, _ in imports_of(path)]
    assert "sd_plugin.storage.loading" in targets and "sd_plugin.evaluation.masking_curve" in targets
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from .trainer import _secret\n")
    assert imports_of(fake, "sd_plugin.integrations.x") == [("sd_plugin.integrations.trainer", ["_secret"])]
    fake.write_text("from ..integrations.trainer import SaliencyDecorTrainer\n")  # the core importing a front-end
    ((target, _),) = imports_of(fake, "sd_plugin.core.x")
    assert layer(unit(target)) > layer(unit("sd_plugin.core.x"))  # what test_imports_point_down_the_layers flags


def test_no_deprecated_aliases_left():
    """Issue 21: the 0.1 names were never released (no tag, only [Unreleased]), so they are gone, not aliased."""
    import importlib

    import pytest

    import sd_plugin

    for module in ("sd_plugin.loss", "sd_plugin.features", "sd_plugin.evaluation.saliency", "sd_plugin.hub.folding"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(module)
    assert "SaliencyDecorLoss" not in sd_plugin.__all__ and not hasattr(sd_plugin, "SaliencyDecorLoss")
    for path in PACKAGE.rglob("*.py"):
        assert "DeprecationWarning" not in path.read_text(), path


def test_nothing_in_the_repository_points_to_files_outside_it():
    """The design notes and tools the project was built with are not in the repository: no file cites them."""
    root = PACKAGE.parent
    outside = ("DESIGN.md", "PAPER.md", "../shared", "../.library", "/work/")
    files = [p for p in root.glob("*.md") if p.name != "CHANGELOG.md"]  # the changelog keeps history as it was
    for folder in ("sd_plugin", "tests", "recipes", "benchmarks", ".ci", "docs"):
        files += [p for p in (root / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".md", "")]
    files = [p for p in files if "results" not in p.relative_to(root).parts and "__pycache__" not in p.parts]
    found = [
        f"{path.relative_to(root)}: {needle}"
        for path in files
        for needle in outside
        if needle in path.read_text(errors="ignore") and path != Path(__file__).resolve()
    ]
    assert not found, "\n".join(found)


def test_benchmark_scripts_import_each_other_by_name_without_editing_sys_path():
    """A script's folder is on the path when it runs (and pytest's ``pythonpath``): no ``sys.path`` edits."""
    scripts = sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
    assert scripts
    assert [p.name for p in scripts if "sys.path" in p.read_text()] == []


def test_benchmarks_readme_indexes_every_script():
    folder = PACKAGE.parent / "benchmarks"
    index = (folder / "README.md").read_text()
    scripts = sorted(p.name for p in folder.iterdir() if p.suffix in (".py", ".sh"))
    assert scripts
    assert [name for name in scripts if f"`{name}`" not in index] == []
