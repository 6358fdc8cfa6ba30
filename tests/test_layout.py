"""The layout holds: no import runs back up from federation/ or the App files to a script.

The repository has floors (README, "Files"): the scripts a user runs on top (client.py,
server.py, demo.py, ...), federation/ in the middle, model.py on the ground. A file of
federation/, client_app.py or server_app.py that imports a script brings that script's
start-up along (client.py's TLS probing, retries and signal handling once came into every
ClientApp that way), and a circle of imports inside federation/ makes a module that only
works when imported in the right order. Both are read statically from the source with
`ast`, every import counted (also one inside a function): nothing is imported, so this
takes milliseconds.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDERATION = ROOT / "federation"
# The ground floor: a library module at the top level that anything may import.
LIBRARY = {"model"}
# A script is every other .py at the top level, so a new one is covered without a list here.
SCRIPTS = {p.stem for p in ROOT.glob("*.py")} - LIBRARY
CHECKED = [*sorted(FEDERATION.glob("*.py")), ROOT / "client_app.py", ROOT / "server_app.py"]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; relative imports inside
    federation/ resolved to federation.NAME, and `from federation import x` to
    federation.x when x is a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: only federation/ is a package here
                base = ".".join(filter(None, ["federation", base]))
            found.append((node.lineno, base))
            if base == "federation":
                found += [(node.lineno, f"federation.{alias.name}") for alias in node.names
                          if (FEDERATION / f"{alias.name}.py").is_file()]
    return found


def test_the_scripts_we_check_against_exist():
    """The rule below is only as good as the set of scripts it knows (it must not be empty
    because the glob went wrong)."""
    assert {"client", "server", "demo", "client_app", "server_app"} <= SCRIPTS
    assert all((ROOT / f"{name}.py").is_file() for name in LIBRARY)


def test_no_federation_or_app_file_imports_a_script():
    problems = [
        f"{path.relative_to(ROOT)}:{line} imports {module.split('.')[0]}.py, a top-level "
        "script"
        for path in CHECKED for line, module in imports(path)
        if module.split(".")[0] in SCRIPTS
    ]
    assert not problems, (
        "federation/ and the App files (client_app.py, server_app.py) may import "
        f"federation/ and {', '.join(f'{m}.py' for m in sorted(LIBRARY))}, never a script; "
        "move what they need from the script into federation/:\n  " + "\n  ".join(problems))


def test_federation_modules_import_no_circle():
    graph = {
        path.stem: sorted({module.split(".")[1] for _, module in imports(path)
                           if module.startswith("federation.")} - {path.stem})
        for path in FEDERATION.glob("*.py")
    }
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def circle_from(name: str, stack: list[str]) -> list[str] | None:
        state[name] = "open"
        for other in graph.get(name, []):
            if state.get(other) == "open":
                return [*stack[stack.index(other):], other]
            if other not in state:
                found = circle_from(other, [*stack, other])
                if found:
                    return found
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            circle = circle_from(name, [name])
            assert circle is None, (
                "federation/ imports in a circle: " + " -> ".join(f"{m}.py" for m in circle)
                + "; move what both need into a module of its own (a lower floor)")
