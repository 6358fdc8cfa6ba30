"""The tests' own layout: no file in tests/ imports a test module, conftest.py or a benchmark.

Shared helpers live in tests/helpers.py and shared fixtures in tests/conftest.py. A test
module that imports another runs (and collects) code it did not ask for, hides where a
helper is defined, and breaks when that module is renamed; a test that imports a
benchmark makes the benchmark part of the product without saying so. Read with `ast`:
every `import`, `from ... import`, `importlib.import_module("...")` and a module loaded
from a file (`spec_from_file_location`), at any depth.
"""

import ast
import pathlib

from helpers import REPO

TESTS = REPO / "tests"


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in path, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from benchmarks import bench_x` names the module in the alias.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                             "__import__")):
            found.append((node.lineno, node.args[0].value))
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith(
                "spec_from_file_location") and len(node.args) > 1):
            # importlib.util.spec_from_file_location("x", REPO / "benchmarks" / "x.py"): a
            # module loaded from a path; what counts is the file it names.
            path = ast.unparse(node.args[1])
            if "benchmarks" in path or "test_" in path:
                names = sorted((c.col_offset, str(c.value).removesuffix(".py"))
                               for c in ast.walk(node.args[1]) if isinstance(c, ast.Constant))
                found.append((node.lineno, ".".join(name for _, name in names)))
    return found


def forbidden(module: str) -> str | None:
    """Why a file in tests/ may not import module, or None."""
    parts = module.split(".")
    test_modules = {p.stem for p in TESTS.glob("test_*.py")} | {"conftest"}
    benchmarks = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    if parts[0] in test_modules or (parts[0] == "tests" and len(parts) > 1
                                    and parts[1] in test_modules):
        return "a test module"
    if parts[0] == "benchmarks" or parts[0] in benchmarks:
        return "a benchmark"
    return None


def test_no_test_file_imports_a_test_module_or_a_benchmark():
    problems = [f"tests/{path.name}:{line} imports {module} ({why})"
                for path in sorted(TESTS.glob("*.py"))
                for line, module in imported_modules(path)
                if (why := forbidden(module))]
    assert problems == [], (
        "move what these imports need into tests/helpers.py (plain helpers) or a "
        "tests/conftest.py fixture, or into federation/ if a benchmark and a test both "
        "need it:\n  " + "\n  ".join(problems))


def test_the_check_sees_every_kind_of_import(tmp_path):
    """The check itself: each way of importing a test module or a benchmark is caught."""
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "import importlib\n"
        "from test_federation import free_port\n"
        "def f():\n"
        "    import conftest\n"
        "    from benchmarks import bench_noniid\n"
        "    import bench_secagg\n"
        "    importlib.import_module('message_sizes_app')\n"
        "import helpers, model\n"
        "spec = importlib.util.spec_from_file_location('b', REPO / 'benchmarks' / 'b.py')\n")
    assert sorted((line, module) for line, module in imported_modules(planted)
                  if forbidden(module)) == [(2, "test_federation.free_port"), (4, "conftest"),
                  (5, "benchmarks.bench_noniid"), (6, "bench_secagg"),
                  (7, "message_sizes_app"), (9, "benchmarks.b")]
