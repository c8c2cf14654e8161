"""The shape of the code, checked: no import cycles, config a leaf, short functions, no private reach-ins.

These read the source as text (``ast``); nothing here imports the modules it checks.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "difftune"
#: ``"difftune.models.sd:StableDiffusion"``: where a lazily registered entry lives (an import on first use).
LAZY_LOCATION = re.compile(r"^(difftune(?:\.\w+)+):\w+$")
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Nodes inside ``if TYPE_CHECKING:`` blocks (annotations only; they never run)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def _target(name: str) -> str | None:
    """The difftune module that importing ``name`` runs (the longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """difftune modules ``module`` imports: at the top, inside functions, and registered lazily by location."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(_target(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else _target(base))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = LAZY_LOCATION.match(node.value)
            if match:
                found.add(_target(match.group(1)))
    return {m for m in found if m and m.startswith("difftune") and m != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read_completely():
    # Known edges of each kind, so a walker that stopped seeing imports would fail here first.
    assert "difftune.config.schema" in GRAPH["difftune.config.loader"]  # top-level import
    assert "difftune.models.loading" in GRAPH["difftune.models"]  # function-level import
    assert "difftune.models.sd" in GRAPH["difftune.models"]  # lazy registration by location
    assert "difftune.models.base" not in GRAPH["difftune.models"]  # under TYPE_CHECKING only


def test_no_import_cycle_among_difftune_modules():
    assert _cycles(GRAPH) == []


def _package(module: str) -> str:
    """``difftune.training.step`` -> ``training``; top-level modules are their own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_cycle_among_difftune_packages():
    """The packages form layers (docs/architecture.md): config at the bottom, training and the CLI on top."""
    packages: dict[str, set[str]] = {}
    for module, imported in GRAPH.items():
        packages.setdefault(_package(module), set()).update(
            _package(m) for m in imported if _package(m) != _package(module))
    assert _cycles(packages) == []
    assert packages["config"] <= {"errors"}
    applications = {"cli", "demo", "ui", "difftune", "__main__"}  # the top: what people run; nothing imports them
    assert "training" not in set().union(*(deps for name, deps in packages.items() if name not in applications))
    assert not applications & set().union(*(deps for name, deps in packages.items() if name not in applications))


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_is_a_leaf():
    """The config package imports nothing of difftune but itself and the error types."""
    allowed = {"difftune.errors"}
    for module, imported in GRAPH.items():
        if module.startswith("difftune.config"):
            outside = {m for m in imported if not m.startswith("difftune.config") and m not in allowed}
            assert not outside, f"{module} imports {sorted(outside)}"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_in_src_is_longer_than_sixty_lines():
    long = []
    for path in MODULES.values():
        for fn in _functions(ast.parse(path.read_text())):
            first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
            if fn.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - first + 1} lines)")
    assert long == []


def _private_uses(tree: ast.AST) -> list[str]:
    """``from difftune.x import _y``, and ``m._y`` where ``m`` is a difftune module imported by the file."""
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("difftune"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                elif f"{node.module}.{alias.name}" in MODULES:
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("difftune") and alias.asname:
                    aliases.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
                and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")):
            found.append(f"setattr({node.args[0].id}, {node.args[1].value!r})")
    return found


@pytest.mark.parametrize("folder", ["tests", "benchmarks", "scripts", "src"])
def test_no_module_uses_a_private_name_of_another(folder):
    offenders = {str(p.relative_to(ROOT)): uses for p in sorted((ROOT / folder).rglob("*.py"))
                 if (uses := _private_uses(ast.parse(p.read_text())))}
    assert offenders == {}


def test_private_use_detection():
    tree = ast.parse("import difftune.training.step as step\nfrom difftune.training import checkpoint as ckpt\n"
                     "from difftune.training.loop import _loss\nx = ckpt._sha256\nmonkeypatch.setattr(step, '_a', 1)\n"
                     "y = step.micro_batch_loss\n")
    assert _private_uses(tree) == ["from difftune.training.loop import _loss", "ckpt._sha256",
                                   "setattr(step, '_a')"]


def test_validate_is_instant_and_never_imports_torch(tmp_path, tiny_sd, shapes_data):
    """``difftune validate`` on a good config checks everything without importing torch (and so in well under 0.5 s)."""
    (tmp_path / "run.toml").write_text(
        f'[model]\npath = "{tiny_sd}"\n[method]\ntype = "pivotal"\ntoken = "<sks>"\ninitializer_token = "dog"\n'
        f'[data]\npath = "{shapes_data}"\n[output]\ndir = "{tmp_path / "out"}"\n'
    )
    probe = (
        "import sys\n"
        "from difftune.cli import main\n"
        f"code = main(['validate', {str(tmp_path / 'run.toml')!r}])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate', 'numpy')"
        " if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ": ok (model" in done.stdout
    assert "heavy: []" in done.stdout


def test_a_bad_method_setting_is_caught_by_validate_without_torch(tmp_path, tiny_sd, shapes_data):
    (tmp_path / "run.toml").write_text(
        f'[model]\npath = "{tiny_sd}"\n[method]\ntype = "textual_inversion"\n'
        f'[data]\npath = "{shapes_data}"\n'
    )
    probe = (
        "import sys\nfrom difftune.cli import main\n"
        f"code = main(['validate', {str(tmp_path / 'run.toml')!r}])\n"
        "assert 'torch' not in sys.modules\nsys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "difftune: error: method.token: required for method.type = 'textual_inversion', " \
                                  "e.g. token = \"<sks>\""


def test_test_folders_mirror_the_packages():
    """``tests/<package>/`` exists only for a package of ``src/difftune`` (tests live beside what they test)."""
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders and folders <= packages, sorted(folders - packages)
