"""The layout's import rules, read from the source (every `import` and `from ... import`, including
those inside functions):

- a service (`embedder_svc`, `search_svc`, `gateway`) imports only the contracts (`vsearch.v1`),
  `service_kit` and its own package: never the CLI's package (`vsearch_cli`), never another service;
- `service_kit` imports only the contracts and itself; the contracts package (`vsearch`) imports
  only itself;
- no import cycle between the top-level packages, nor between the rooms of `vsearch_cli` (its
  subpackages, and the modules beside them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

FIRST_PARTY = ("vsearch", "vsearch_cli", "embedder_svc", "search_svc", "gateway", "service_kit")
SERVICES = ("embedder_svc", "search_svc", "gateway")
# What each package may import from the project, besides itself.
ALLOWED = {
    **{service: ("vsearch.v1", "service_kit") for service in SERVICES},
    "service_kit": ("vsearch.v1",),
    "vsearch": (),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every first-party import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` may import a submodule: count pkg.sub where it is one.
            names = [f"{prefix}.{alias.name}" if (root / f"{prefix}.{alias.name}".replace(".", "/")).exists()
                     or (root / (f"{prefix}.{alias.name}".replace(".", "/") + ".py")).exists() else prefix
                     for alias in node.names]
        else:
            continue
        found.extend((node.lineno, name) for name in names if name.split(".")[0] in FIRST_PARTY)
    return found


def source_files(root: Path, package: str) -> list[Path]:
    return sorted(path for path in (root / package).rglob("*.py") if "__pycache__" not in path.parts)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_violations(root: Path) -> list[str]:
    problems = []
    for package, allowed in ALLOWED.items():
        for path in source_files(root, package):
            for line, module in imported_modules(path, root):
                if within(module, package) or any(within(module, target) for target in allowed):
                    continue
                problems.append(f"{path.relative_to(root)}:{line} imports {module}")
    return problems


def room_of(module: str) -> str:
    """The unit whose cycles count: a top-level package, or one room of the CLI's package (a
    subpackage such as `vsearch_cli.bench`, or a module beside them such as `vsearch_cli.main`)."""
    parts = module.split(".")
    if parts[0] == "vsearch_cli":
        return ".".join(parts[:2])
    return parts[0]


def room_graph(root: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in FIRST_PARTY:
        for path in source_files(root, package):
            source = room_of(module_name(path, root))
            for _line, module in imported_modules(path, root):
                if (target := room_of(module)) != source:
                    graph.setdefault(source, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            if cycle := visit(target):
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return None


def test_services_import_only_the_contracts_service_kit_and_themselves():
    assert import_violations(REPO_ROOT) == []


def test_no_import_cycle_between_packages_or_rooms():
    graph = room_graph(REPO_ROOT)
    assert {"vsearch_cli.main", "vsearch_cli.bench", "vsearch_cli.model_tools", "gateway"} <= set(graph), graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# ---- the checks catch what they are for -----------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in FIRST_PARTY:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


@pytest.mark.parametrize(("file", "line"), [
    ("gateway/core.py", "from vsearch_cli.catalog.ingest import DEFAULT_GATEWAY"),
    ("gateway/core.py", "import embedder_svc.model_card"),
    ("search_svc/store.py", "from gateway import cache"),
    ("service_kit/server.py", "from search_svc.settings import SearchSettings"),
    ("embedder_svc/engine.py", "    from vsearch_cli.model_tools import prepare  # inside a function"),
])
def test_a_forbidden_import_is_reported(tmp_path: Path, file: str, line: str):
    body = line if not line.startswith("    ") else f"def f():\n{line}\n"
    root = write_tree(tmp_path, {
        file: body + "\n", "vsearch_cli/catalog/__init__.py": "", "vsearch_cli/catalog/ingest.py": "",
        "vsearch_cli/model_tools/__init__.py": "", "vsearch_cli/model_tools/prepare.py": "",
        "embedder_svc/model_card.py": "", "search_svc/settings.py": "", "gateway/cache.py": "",
    })
    assert [problem.split(" imports ")[0] for problem in import_violations(root)] == [f"{file}:{1 if not line.startswith('    ') else 2}"]


def test_allowed_imports_pass(tmp_path: Path):
    root = write_tree(tmp_path, {
        "gateway/core.py": "from vsearch.v1 import gateway_pb2\nfrom service_kit.status import ServiceError\n"
                           "from gateway.cache import QueryCache\nfrom . import cache\n",
        "gateway/cache.py": "", "service_kit/status.py": "", "vsearch/v1/__init__.py": "", "vsearch/v1/gateway_pb2.py": "",
        "vsearch_cli/main.py": "from gateway import core\nfrom embedder_svc import model_card\n",
        "embedder_svc/model_card.py": "",
    })
    assert import_violations(root) == []


def test_a_cycle_between_rooms_is_found(tmp_path: Path):
    root = write_tree(tmp_path, {
        "vsearch_cli/bench/__init__.py": "", "vsearch_cli/bench/stack.py": "from vsearch_cli.main import main\n",
        "vsearch_cli/main.py": "from vsearch_cli.bench import stack\n",
    })
    assert find_cycle(room_graph(root)) == ["vsearch_cli.bench", "vsearch_cli.main", "vsearch_cli.bench"]
    (root / "vsearch_cli/bench/stack.py").write_text("from vsearch_cli.local_stack import launcher\n")
    (root / "vsearch_cli/local_stack").mkdir()
    (root / "vsearch_cli/local_stack/launcher.py").write_text("")
    assert find_cycle(room_graph(root)) is None
