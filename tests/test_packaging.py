"""The Flower App installs as pyproject.toml declares it (no processes, well under a second).

`flwr run .` builds a bundle (FAB) of pyproject's fab-include files and, unless told not to,
installs pyproject's [project] dependencies into a fresh environment. So every third-party
package the ServerApp and ClientApp import, however deep, must be declared there, and every
local module they import must be in the bundle. These tests follow the imports with `ast`
(nothing is imported), from server_app.py and client_app.py through the repo's own modules.
"""

import ast
import fnmatch
import functools
import importlib.metadata
import pathlib
import re
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
APP_ENTRY_POINTS = ("server_app.py", "client_app.py")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _local_module(name: str) -> pathlib.Path | None:
    """The repo file of a dotted module name ("federation.privacy"), or None if not ours."""
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: pathlib.Path) -> set[str]:
    """Every absolute module name imported anywhere in a file (function bodies too), with
    `from pkg import name` also giving "pkg.name" (name may be a module of pkg)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the file's own package, `level` dots up
                package = path.relative_to(REPO).parent.parts
                base = package[:len(package) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module:
                names.add(module)
            names.update(f"{module}.{alias.name}".lstrip(".") for alias in node.names)
    return names


@functools.cache  # two tests walk the same graph
def app_imports() -> tuple[set[pathlib.Path], set[str]]:
    """(the repo's files the App imports, entry points included; the top-level names of
    the other modules it imports, standard library left out)."""
    seen, todo, outside = set(), [REPO / p for p in APP_ENTRY_POINTS], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            parts = name.split(".")
            local = [_local_module(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
            if local[0] is not None:  # ours: follow the module and every package above it
                todo += [p for p in local if p is not None]
            elif parts[0] not in sys.stdlib_module_names:
                outside.add(parts[0])
    return seen, outside


def _requirement_name(requirement: str) -> str:
    """'flwr[simulation]==1.42.0' -> 'flwr', normalised as PEP 503 says."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(requirements: list[str]) -> dict[str, str]:
    """{normalised name: version} of 'name[extras]==version' lines."""
    return {_requirement_name(r): r.split("==", 1)[1].split(";")[0].strip()
            for r in requirements if "==" in r}


def test_pyproject_declares_every_package_the_app_imports():
    declared = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    _, imported = app_imports()
    assert {"flwr", "jax", "numpy"} <= imported  # the walk finds what it must
    missing = {}
    for module in sorted(imported):
        names = {_requirement_name(d) for d in distributions.get(module, [])}
        assert names, f"no installed distribution provides the module {module!r}"
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, (
        "pyproject.toml's [project] dependencies lack what the Flower App imports: "
        + "; ".join(f"import {m} needs {' or '.join(d)}" for m, d in missing.items())
        + " (`flwr run .` installs only those dependencies)")


def test_the_app_bundle_holds_every_local_module_the_app_imports():
    patterns = PYPROJECT["tool"]["flwr"]["app"]["fab-include"]
    files, _ = app_imports()
    left_out = sorted(str(f.relative_to(REPO)) for f in files
                      if not any(fnmatch.fnmatch(f.relative_to(REPO).as_posix(), p)
                                 for p in patterns))
    assert len(files) > len(APP_ENTRY_POINTS)  # the walk follows local imports
    assert not left_out, (f"pyproject.toml's fab-include leaves out {', '.join(left_out)}, "
                          "which the Flower App imports: `flwr run .` would fail at import")


def test_pyproject_pins_what_constraints_txt_pins():
    """pyproject and constraints.txt (which requirements.txt installs) move together."""
    declared = _pins(PYPROJECT["project"]["dependencies"])
    lines = (REPO / "constraints.txt").read_text().splitlines()
    constrained = _pins([line for line in lines if not line.startswith("#")])
    differ = {name: (version, constrained.get(name)) for name, version in declared.items()
              if constrained.get(name) != version}
    assert len(declared) == len(PYPROJECT["project"]["dependencies"])  # every one is pinned
    assert not differ, "pyproject.toml and constraints.txt pin differently (pyproject, " \
                       f"constraints): {differ}"
