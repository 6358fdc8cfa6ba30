"""The docs cannot drift: code blocks, commands and links in README.md and docs/ against the source.

Readers copy what the README, the tutorial and the guides show, so three things are checked:

1. Snippets. Every ```python block says where it comes from with a marker on the line
   before it, `<!-- snippet: model.py::train_step -->` (a file, then a function, class or
   Class.method), or `<!-- illustration -->` for code that is not the project's. The block
   must be a contiguous excerpt of that definition (indentation may shift as a whole); a
   line holding only `...` skips source lines, and the pieces must come in source order.
2. Commands. Every command in a ```bash block, and every inline code span that runs a
   script (`python X.py ...`, `X.py --flag`, `flwr ...`, `flower-superlink ...`), names a
   script that exists and only options its parser defines (flags after `demo.py ... --`
   go to server.py); the keys of `flwr run --run-config` must be keys of pyproject.toml's
   [tool.flwr.app.config], because the SuperLink refuses any other.
3. Links. Every relative link and image points to a file that exists, and every #anchor
   to a heading of that file (GitHub's slugs).

The parsers are read from the real scripts, not from a list kept here: one subprocess runs
every script named in the docs with argparse's parse_known_args patched to hand back the
parser instead of parsing (nothing else of the script runs), and walks the `flwr` CLI's
click commands. One process, so JAX and Flower are imported once: a few seconds.
"""

import ast
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TUTORIAL = sorted((ROOT / "docs" / "tutorial").glob("*.md"))
# Where a script named without a path (`sweep_recipe.py --seed` in prose) may live.
SCRIPT_DIRS = (ROOT, ROOT / "benchmarks", ROOT / "docs")
ENTRY_POINTS = ("flower-superlink", "flower-supernode")  # argparse CLIs of Flower

FENCE = re.compile(r"^(\s*)(`{3,})([\w-]*)\s*$")
MARKER = re.compile(
    r"^<!--\s*(snippet:\s*(?P<path>[\w./-]+)::(?P<name>[\w.]+)|illustration)\s*-->$")
LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")  # may wrap onto the next line


# ---------------------------------------------------------------------------- reading docs

@dataclass
class Block:
    """A fenced code block: where it is, its language, its text, the marker line before it."""
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


@functools.cache
def blocks(doc: Path) -> tuple[Block, ...]:
    """Every fenced code block of a Markdown file."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        before = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        found.append(Block(doc, start + 1, lang, "\n".join(lines[start + 1:j]),
                           before if MARKER.match(before) else None))
        i = j + 1
    return tuple(found)


@functools.cache
def prose(doc: Path) -> str:
    """The text outside fenced blocks (inline code kept)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out, fence = [], None
    for line in lines:
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
            out.append("")
        elif fence is not None:
            if line.strip() == fence:
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def rel(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


# ------------------------------------------------------------------------------- snippets

def definition_lines(path: Path, qualname: str) -> list[str]:
    """The source lines of a function/class (decorators included), by qualified name."""
    source = path.read_text(encoding="utf-8")
    nodes: list[ast.AST] = [ast.parse(source)]
    for part in qualname.split("."):
        nodes = [child for node in nodes for child in ast.iter_child_nodes(node)
                 if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and child.name == part]
        if not nodes:
            raise LookupError(f"{qualname} is not defined in {path.relative_to(ROOT)}")
    node = nodes[0]
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return source.splitlines()[first - 1:node.end_lineno]


def find_excerpt(source: list[str], chunk: list[str], start: int) -> int | None:
    """Index after the first run of source lines, at or after start, that equals chunk
    shifted by one common indentation; None if there is none."""
    for i in range(start, len(source) - len(chunk) + 1):
        line = source[i]
        indent = line[:len(line) - len(line.lstrip())]
        if not chunk[0] or line.strip() != chunk[0].strip() or not indent.endswith(
                chunk[0][:len(chunk[0]) - len(chunk[0].lstrip())]):
            continue
        shift = indent[:len(indent) - (len(chunk[0]) - len(chunk[0].lstrip()))]
        if all((source[i + k].rstrip() == (shift + c).rstrip()) if c.strip()
               else not source[i + k].strip() for k, c in enumerate(chunk)):
            return i + len(chunk)
    return None


def snippet_problem(block: Block) -> str | None:
    """Why a marked block is not an excerpt of the code it names, or None."""
    m = MARKER.match(block.marker or "")
    assert m and m.group("path")
    path = ROOT / m.group("path")
    if not path.is_file():
        return f"{m.group('path')} does not exist"
    try:
        source = definition_lines(path, m.group("name"))
    except LookupError as e:
        return str(e)
    chunks, current = [], []
    for line in block.text.splitlines():
        if line.strip() == "...":
            chunks.append(current)
            current = []
        else:
            current.append(line)
    chunks.append(current)
    position = 0
    for chunk in chunks:
        while chunk and not chunk[0].strip():
            chunk.pop(0)
        while chunk and not chunk[-1].strip():
            chunk.pop()
        if not chunk:
            continue
        found = find_excerpt(source, textwrap.dedent("\n".join(chunk)).splitlines(), position)
        if found is None:
            return (f"these lines are not (in this order) in {m.group('path')}::"
                    f"{m.group('name')}:\n" + "\n".join(chunk))
        position = found
    return None


def test_every_python_block_says_where_it_comes_from() -> None:
    unmarked = [b.where() for doc in DOCS for b in blocks(doc)
                if b.lang == "python" and b.marker is None]
    assert not unmarked, ("a ```python block needs <!-- snippet: FILE::NAME --> or "
                          f"<!-- illustration --> on the line before it: {unmarked}")


def test_every_snippet_is_an_excerpt_of_the_code_it_names() -> None:
    problems = [f"{b.where()}: {snippet_problem(b)}" for doc in DOCS for b in blocks(doc)
                if b.marker and "snippet:" in b.marker and snippet_problem(b)]
    assert not problems, "snippets out of date with the source:\n\n" + "\n\n".join(problems)


def test_every_snippet_marker_is_followed_by_a_python_block() -> None:
    # A marker whose block was deleted or turned into another language checks nothing.
    marked = {(b.doc, b.line) for doc in DOCS for b in blocks(doc) if b.marker}
    stray = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if MARKER.match(line.strip()):
                nxt = next((k for k in range(i + 1, len(lines)) if lines[k].strip()), None)
                if nxt is None or (doc, nxt + 1) not in marked or not FENCE.match(lines[nxt]):
                    stray.append(f"{rel(doc)}:{i + 1}")
    assert not stray, f"snippet markers not directly before a code block: {stray}"


def test_the_snippet_check_catches_an_edited_line() -> None:
    # The checker itself: an excerpt passes, the same excerpt with one changed token fails.
    block = Block(ROOT / "README.md", 0, "python",
                  "def apply(params: Params, images: jax.Array) -> jax.Array:\n    ...\n"
                  "    return x @ params[\"dense2\"][\"w\"] + params[\"dense2\"][\"b\"]"
                  "             # (B, 10)", "<!-- snippet: model.py::apply -->")
    assert snippet_problem(block) is None
    block.text = block.text.replace("dense2", "dense3", 1)
    assert "not (in this order) in model.py::apply" in snippet_problem(block)


# ------------------------------------------------------------------------------- commands

# Runs in a fresh interpreter: prints {"scripts": {path: parser}, "entry": {...}, "flwr": {...}}
# where a parser is {"options": [...], "subcommands": {name: [options]}}.
_PARSER_PROBE = r'''
import argparse, contextlib, importlib.metadata, io, json, os, runpy, sys

class Captured(BaseException):
    pass

def describe(parser):
    out = {"options": sorted(s for a in parser._actions for s in a.option_strings),
           "subcommands": {}}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out["subcommands"][name] = sorted(s for a in sub._actions for s in a.option_strings)
    return out

def capture(run):
    def parse_known_args(self, *args, **kwargs):
        raise Captured(self)
    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            run()
    except Captured as c:
        return describe(c.args[0])
    except BaseException as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        argparse.ArgumentParser.parse_known_args = original
    return {"error": "it never parsed its arguments"}

request = json.loads(sys.argv[1])
root = request["root"]
# peer.py parses its flags in the worker process it starts, unless it is one: be one
# (federation/peer_supervisor.py; -1: no pipe to its parent, which it then skips).
os.environ["FL_PEER_SUPERVISOR_FD"] = "-1"
result = {"scripts": {}, "entry": {}, "flwr": {}}
for script in request["scripts"]:
    path = os.path.join(root, script)
    sys.argv = [path]
    sys.path[:0] = [os.path.dirname(path), root]
    result["scripts"][script] = capture(lambda: runpy.run_path(path, run_name="__main__"))
    del sys.path[:2]
eps = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts")}
for name in request["entry"]:
    sys.argv = [name]
    result["entry"][name] = capture(lambda: eps[name].load()())
if request["flwr"]:
    import click, typer
    from flwr.cli.app import app
    def walk(command, path):
        result["flwr"][" ".join(path)] = {
            "options": sorted(o for p in command.params for o in p.opts + p.secondary_opts)
                       + ["--help", "-h"],
            "group": isinstance(command, click.Group)}
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, path + [name])
    walk(typer.main.get_command(app), ["flwr"])
print(json.dumps(result))
'''


@dataclass
class Command:
    """One simple command found in the docs: where, and its words."""
    where: str
    words: list[str]


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ; & && | || and parentheses),
    comments, redirections and leading variable assignments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError as e:  # unbalanced quotes
        return [["<unparsable>", str(e), line]]
    commands, current, skip = [], [], False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in (";", "&", "&&", "|", "||", "(", ")", ";;"):
            commands.append(current)
            current = []
        elif token in (">", ">>", "<", ">&", "<&", "&>", "2>"):
            skip = True
            if current and current[-1].isdigit():  # 2>&1: the 2 belongs to the redirection
                current.pop()
        else:
            current.append(token)
    commands.append(current)
    out = []
    for words in commands:
        while words and (words[0] in ("do", "then", "else", "time", "exec", "nohup")
                         or re.match(r"^[A-Za-z_]\w*=", words[0])):
            words = words[1:]
        if words:
            out.append(words)
    return out


def is_command(words: list[str]) -> bool:
    """Whether these words run something this test knows how to check."""
    head = words[0]
    return (head in ("python", "python3") and len(words) > 1 and words[1].endswith(".py")
            or head.endswith(".py") or head in ("flwr", *ENTRY_POINTS)
            or head == "pip" and "-r" in words)


@functools.cache
def commands() -> tuple[Command, ...]:
    """Every checkable command in ```bash blocks and inline code of the docs."""
    found = []
    for doc in DOCS:
        for b in blocks(doc):
            if b.lang not in ("bash", "sh", "shell", "console"):
                continue
            logical = re.sub(r"\\\n\s*", " ", b.text)
            for n, line in enumerate(logical.splitlines()):
                for words in split_commands(line):
                    if is_command(words):
                        found.append(Command(f"{b.where()} (line {n + 1} of the block)", words))
        text = prose(doc)
        for m in INLINE_CODE.finditer(text):
            n = text.count("\n", 0, m.start()) + 1
            span = " ".join(m.group(1).split()).replace("\\|", "/")  # `a\|b` in a table: a|b
            for words in split_commands(span):
                # A script in prose counts as a command when it has options.
                if is_command(words) and (words[0] in ("python", "python3", "flwr",
                                                       *ENTRY_POINTS)
                                          or any(w.startswith("-") for w in words[1:])):
                    found.append(Command(f"{rel(doc)}:{n} (inline `{span}`)", words))
    return tuple(found)


def resolve_script(word: str, with_python: bool) -> str | None:
    """The script's path relative to ROOT: as written after `python` (commands run from the
    repository's root), or by name among SCRIPT_DIRS in prose."""
    if with_python:
        return word if (ROOT / word).is_file() else None
    for directory in SCRIPT_DIRS:
        if (directory / word).is_file():
            return str((directory / word).relative_to(ROOT))
    return None


@pytest.fixture(scope="module")
def parsers() -> dict:
    """Every parser the docs' commands need, read from the real code in one subprocess."""
    scripts = {"server.py"}
    for c in commands():
        if c.words[0].endswith(".py"):
            scripts.add(resolve_script(c.words[0], False) or "")
        elif c.words[0] in ("python", "python3"):
            scripts.add(resolve_script(c.words[1], True) or "")
    scripts.discard("")
    entry = sorted({c.words[0] for c in commands() if c.words[0] in ENTRY_POINTS})
    request = {"root": str(ROOT), "scripts": sorted(scripts), "entry": entry,
               "flwr": any(c.words[0] == "flwr" for c in commands())}
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", _PARSER_PROBE, json.dumps(request)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def pyproject_run_config_keys() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def option_problems(words: list[str], known: list[str], what: str) -> list[str]:
    """The options among words that the parser does not define."""
    problems = []
    for word in words:
        if word == "--":
            break
        if re.match(r"^--?[A-Za-z]", word):
            option = word.split("=", 1)[0]
            if option not in known:
                problems.append(f"{what} has no option {option}")
    return problems


def check_script(words: list[str], script: str, parser: dict, parsers: dict) -> list[str]:
    """Problems of `script args...` against its parser (and server.py's after demo.py's --)."""
    if "error" in parser:
        return [f"could not read the parser of {script}: {parser['error']}"]
    known = list(parser["options"])
    subcommands = parser["subcommands"]
    chosen = next((w for w in words if w in subcommands), None)
    if subcommands and chosen is None and not any(w in ("-h", "--help") for w in words):
        return [f"{script} needs one of the subcommands {sorted(subcommands)}"]
    if chosen:
        known += subcommands[chosen]
    problems = option_problems(words, known, script)
    if "--" in words:
        if script != "demo.py":
            problems.append(f"{script} does not pass flags after -- anywhere")
        else:
            rest = words[words.index("--") + 1:]
            problems += option_problems(rest, parsers["scripts"]["server.py"]["options"],
                                        "server.py (after demo.py's --)")
    return problems


def check_flwr(words: list[str], parsers: dict) -> list[str]:
    """Problems of `flwr sub ... args` against Flower's click commands and pyproject."""
    path, i = ["flwr"], 1
    while parsers["flwr"][" ".join(path)]["group"] and i < len(words) \
            and not words[i].startswith("-"):
        if " ".join(path + [words[i]]) not in parsers["flwr"]:
            return [f"flwr has no command {' '.join(path[1:] + [words[i]])}"]
        path.append(words[i])
        i += 1
    name = " ".join(path)
    if parsers["flwr"][name]["group"] and len(path) > 1:
        return [f"`{name}` needs a subcommand"]
    problems = option_problems(words[i:], parsers["flwr"][name]["options"], name)
    if name == "flwr run":
        allowed = pyproject_run_config_keys()
        for j, word in enumerate(words):
            values = [words[j + 1]] if word in ("--run-config", "-c") and j + 1 < len(words) \
                else [word.split("=", 1)[1]] if word.startswith("--run-config=") else []
            for value in values:
                for pair in shlex.split(value):
                    key = pair.split("=", 1)[0]
                    if "=" in pair and key not in allowed:
                        problems.append(f"--run-config key {key} is not in pyproject.toml's "
                                        "[tool.flwr.app.config] (the SuperLink refuses it)")
    return problems


def command_problems(c: Command, parsers: dict) -> list[str]:
    words = c.words
    if words[0] == "pip":
        requirement = words[words.index("-r") + 1] if words.index("-r") + 1 < len(words) else ""
        return [] if (ROOT / requirement).is_file() else [f"pip -r {requirement}: no such file"]
    if words[0] == "flwr":
        return check_flwr(words, parsers)
    if words[0] in ENTRY_POINTS:
        parser = parsers["entry"][words[0]]
        return check_script(words[1:], words[0], parser, parsers)
    with_python = words[0] in ("python", "python3")
    script_word = words[1] if with_python else words[0]
    script = resolve_script(script_word, with_python)
    if script is None:
        return [f"no script {script_word}" + ("" if with_python else " in " + ", ".join(
            str(d.relative_to(ROOT)) or "." for d in SCRIPT_DIRS))]
    args = words[2:] if with_python else words[1:]
    return check_script(args, script, parsers["scripts"][script], parsers)


def test_the_docs_contain_commands_to_check() -> None:
    # Guards the extraction itself: if it found nothing, the next test would pass vacuously.
    heads = {c.words[1] if c.words[0].startswith("python") else c.words[0] for c in commands()}
    assert {"demo.py", "server.py", "client.py", "partition_data.py", "flwr",
            "flower-superlink", "flower-supernode"} <= heads, heads


def test_every_command_names_a_real_script_and_real_options(parsers: dict) -> None:
    problems = [f"{c.where}: {p}" for c in commands() for p in command_problems(c, parsers)]
    assert not problems, "commands in the docs that would fail:\n" + "\n".join(problems)


def test_the_command_check_catches_a_renamed_flag(parsers: dict) -> None:
    # The checker itself, on the real parsers: a flag server.py has, one it lacks.
    ok = Command("test", ["python", "server.py", "--rounds", "3", "--overwrite"])
    bad = Command("test", ["python", "demo.py", "--clients", "3", "--", "--round", "3"])
    assert command_problems(ok, parsers) == []
    assert command_problems(bad, parsers) == [
        "server.py (after demo.py's --) has no option --round"]
    assert check_flwr(["flwr", "run", ".", "--run-config", "num-server-round=2"], parsers)


# ---------------------------------------------------------------------------------- links

def slugs(doc: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(doc).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_every_relative_link_points_to_an_existing_file_and_heading() -> None:
    problems = []
    for doc in DOCS:
        text = INLINE_CODE.sub("", prose(doc))
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                problems.append(f"{rel(doc)}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in slugs(file):
                problems.append(f"{rel(doc)}: {target}: no heading #{anchor} in "
                                f"{file.relative_to(ROOT)}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_tutorial_page_links_to_its_neighbours() -> None:
    names = [p.name for p in TUTORIAL]
    assert names == ["01-why.md", "02-concepts.md", "03-building.md", "04-running.md",
                     "05-privacy-and-next-steps.md"]
    for i, page in enumerate(TUTORIAL):
        links = set(LINK.findall(page.read_text(encoding="utf-8")))
        for neighbour in names[max(i - 1, 0):i] + names[i + 1:i + 2]:
            assert neighbour in links, f"{page.name} does not link to {neighbour}"


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "README.md is the front door: 200 lines at most"
    # .ci/run runs exactly this command; the README's quick start must give the same one.
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^.*&& python -m pytest -q$", readme, re.M)
    assert re.search(r"^python3 -m venv .* && python demo\.py$", readme, re.M)


def test_no_internal_issue_numbers_in_the_docs() -> None:
    # Readers cannot see the tracker: "issue 8" means nothing to them.
    hits = [f"{rel(doc)}:{n}" for doc in DOCS
            for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"\bissues? #?\d+\b", line, re.I)]
    assert not hits, f"internal issue numbers: {hits}"


@functools.cache
def repo_files() -> frozenset[str]:
    """The repository's files, relative to ROOT: hidden directories, caches and virtual
    environments (a quick start's .venv lives here too) left out."""
    out = set()
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != "__pycache__"
                      and not (Path(directory) / d / "pyvenv.cfg").exists()]
        out.update((Path(directory) / f).relative_to(ROOT).as_posix() for f in files)
    return frozenset(out)


def test_every_file_named_in_the_docs_exists() -> None:
    # `federation/strategy.py` or `flower_data.py` in prose: a source file that moved or was renamed
    # leaves the docs pointing at nothing. Paths inside Flower's package are not ours.
    ours = repo_files()
    names = {Path(p).name for p in ours}
    missing = []
    for doc in DOCS:
        text = prose(doc)
        for m in INLINE_CODE.finditer(text):
            span = m.group(1).strip()
            if not re.fullmatch(r"[\w./-]+\.(py|toml|txt)", span) \
                    or span.startswith(("flwr/", "results/", "data/", "/")) or "<" in span:
                continue
            if span not in ours and span not in names:
                line = text.count("\n", 0, m.start()) + 1
                missing.append(f"{rel(doc)}:{line}: {span}")
    assert not missing, "files named in the docs that do not exist:\n" + "\n".join(missing)


def file_map() -> set[str]:
    """The paths the README's file map (the ```text block under "## Files") names in its
    first column: `dir/` lines open a directory for the indented lines below them."""
    heading = (ROOT / "README.md").read_text(encoding="utf-8").splitlines().index("## Files")
    block = next(b for b in blocks(ROOT / "README.md") if b.line > heading and b.lang == "text")
    named, directory = set(), ""
    for line in block.text.splitlines():
        indented = line.startswith(" ")
        names = []
        # Columns are separated by two or more spaces; the names come before the description.
        for field in re.split(r" {2,}", line.strip()):
            if not re.fullmatch(r"[\w.*-]+(/[\w.*-]+)*/?", field) or not (
                    "." in field or field.endswith("/")):
                break
            names.append(field)
        if not names:
            continue
        if not indented:
            directory = names[0] if names[0].endswith("/") else ""
        for name in names:
            named.add(((directory if indented else "") + name).rstrip("/"))
    return named


def test_the_file_map_names_real_files_and_every_python_file() -> None:
    named = file_map()
    missing = sorted(n for n in named if "*" not in n and not (ROOT / n).exists())
    assert not missing, f"the README's file map names files that do not exist: {missing}"
    tracked = [p for p in repo_files() if p.endswith(".py")]
    unlisted = sorted(p for p in tracked if p not in named and not p.startswith("docs/")
                      and not p.endswith("__init__.py"))
    assert not unlisted, f"Python files missing from the README's file map: {unlisted}"
