"""The package's layers: the core never loads the tooling, and no import cycle exists.

The import graph is read from the source with :mod:`ast`: every ``import`` of a fastpipe
module counts, at module level or inside a function (a lazy import still ties the two
modules together: whoever changes one must know the other, and the order in which they
run decides whether it works). Imports under ``if TYPE_CHECKING:`` do not count: they
never run, and they are how a module names a type without depending on its module.
Importing a submodule also runs its parent packages' ``__init__``; that implicit edge is
not counted either (it would make every package a cycle with its own modules).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastpipe

PACKAGE_DIR = Path(fastpipe.__file__).parent
REPO_SRC = str(PACKAGE_DIR.parent)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        modules[module_name(path)] = path
    for path in PACKAGE_DIR.rglob("*.pyx"):  # Cython modules import too
        modules[module_name(path)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node``, skipping the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield child
        yield from _runtime_nodes(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastpipe modules that ``name`` imports anywhere in its code."""
    is_package = path.name in ("__init__.py", "__init__.pyx")
    package = name if is_package else name.rpartition(".")[0]
    source = path.read_text(encoding="utf-8")
    if path.suffix == ".pyx":  # only its Python-level imports parse as Python
        lines = [
            line
            for line in source.splitlines()
            if line.startswith(("import ", "from ")) and " cimport " not in line
        ]
        source = "\n".join(lines)
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one.
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            targets = subs + ([target] if len(subs) < len(node.names) else [])
        else:
            continue
        for target in targets:
            # `import fastpipe.x.y` imports the deepest module that exists.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_graph_sees_real_imports() -> None:
    """The reader finds the edges it must: relative, lazy, ``from . import module``."""
    graph = import_graph()
    assert "fastpipe._engine" in graph["fastpipe"]
    assert "fastpipe.stages.checksum" in graph["fastpipe._stagelist"]  # a lazy import
    assert "fastpipe._stagelist" in graph["fastpipe._engine"]  # from . import module
    assert "fastpipe._console" in graph["fastpipe.cli"]
    assert "fastpipe.tools.bench" in graph["fastpipe.cli"]  # lazy, in its subcommand


def test_tarjan_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_src() -> None:
    cycles = strongly_connected(import_graph())
    assert cycles == [], f"modules that import each other (directly or not): {cycles}"


def test_core_never_imports_the_tools() -> None:
    graph = import_graph()
    core = [m for m in graph if m != "fastpipe.cli" and not m.startswith("fastpipe.tools")]
    for module in core:
        tools = sorted(t for t in graph[module] if t.startswith("fastpipe.tools"))
        assert not tools, f"{module} imports {tools}"


#: What the tools may import from the core: the public face, the stages, the console.
TOOLS_MAY_IMPORT = ("fastpipe", "fastpipe.stages", "fastpipe._console")


def test_tools_use_only_public_names_of_the_core() -> None:
    """Across the line only public names travel: no private module (the console module
    is the shared one), no ``_name`` imported, no ``obj._attribute`` of another object."""
    graph = import_graph()
    modules = all_modules()
    for name, path in modules.items():
        if not name.startswith("fastpipe.tools"):
            continue
        core = {t for t in graph[name] if not t.startswith("fastpipe.tools")}
        assert core <= set(TOOLS_MAY_IMPORT), f"{name} imports {sorted(core)}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                names = [a.name for a in node.names]
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{name} imports {private} from {node.module}"
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "os"))
            ):
                raise AssertionError(f"{name} reaches into .{node.attr} (line {node.lineno})")


def test_import_fastpipe_loads_no_tool() -> None:
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    code = (
        "import sys, fastpipe, fastpipe.stages\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('fastpipe.tools'))\n"
        "print(loaded)\n"
        "assert 'fastpipe._engine' in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_run_loads_no_tool(tmp_path: Path) -> None:
    """`fastpipe run` pays for none of the tooling's imports."""
    local = tmp_path / "f.bin"
    local.write_bytes(b"x")
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    code = (
        "import sys, fastpipe.cli\n"
        f"fastpipe.cli.main(['run', {str(local)!r}, '--json'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('fastpipe.tools')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


#: Modules the CLI's run path does not use: loading them is start-up time for nothing.
NOT_ON_THE_RUN_PATH = ("awscrt", "crc32c", "fastpipe.tools")


def _loaded(prefixes: tuple[str, ...]) -> str:
    """Python that prints which modules under ``prefixes`` are in ``sys.modules``."""
    return (
        "import sys\n"
        f"prefixes = {prefixes!r}\n"
        "print(sorted(m for m in sys.modules"
        " if any(m == p or m.startswith(p + '.') for p in prefixes)))\n"
    )


def test_import_fastpipe_loads_no_crt_crc32c_or_tool() -> None:
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    code = "import fastpipe, fastpipe.cli\n" + _loaded(NOT_ON_THE_RUN_PATH)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_run_on_s3_loads_no_crt(put_object: Any) -> None:
    """botocore loads awscrt whenever it is installed (about 40 ms); the CLI keeps it out,
    and a stage that needs awscrt can still import it afterwards. (With the light control
    plane the run loads no botocore at all: botocore's is asked for here.)"""
    import awscrt  # noqa: F401  (installed: else the test would prove nothing)

    uri = put_object(os.urandom(4096))
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    args = ["run", uri, "--json", "--no-progress", "--control-plane", "botocore"]
    code = (
        "import sys, fastpipe.cli\n"
        f"code = fastpipe.cli.main({args!r})\n"
        "assert code == 0, code\n" + _loaded(NOT_ON_THE_RUN_PATH) + "import botocore.compat\n"
        "print(botocore.compat.HAS_CRT)\n"
        "from awscrt import checksums\n"
        "print(checksums.crc32c(b'abc'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-3:] == ["[]", "False", "910901175"]
