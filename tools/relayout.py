"""Move the flat ``dbtunneld/`` package into one sub-package per layer (issue 16), and rewrite every
reference to the moved modules. Kept in the repo: it documents the move.

    python tools/relayout.py --dry-run    # print the plan (mapping, files to rewrite), change nothing
    python tools/relayout.py              # git mv + rewrite; then commit the result on its own

The layer of each module comes from ``LAYERS`` in tests/test_layers.py (the classification before
the move); a module missing there lands next to its siblings by prefix (``tunnel_state`` next to
``tunnel``), otherwise the script stops and lists it. Layer -> sub-package is ``PACKAGES``.
What is rewritten, in every tracked text file:

* ``from`` imports, via the syntax tree: relative ones are resolved from the file's old place and
  written relative to its new place; ``from dbtunneld import a, b`` is split per new package;
* every other mention of a moved module as ``dbtunneld.x`` or ``dbtunneld/x`` (``import`` lines,
  ``mock.patch`` targets, logger names, ``-m dbtunneld.cli``, entry points, mypy sections, docs);
* tests/test_layers.py (now checks by package with import-linter contracts written to setup.cfg),
  and the few places listed in ``FIXUPS`` that compute module names instead of naming them.

It refuses to run twice (a layer package exists) and on a dirty work tree; a module it cannot
place or a FIXUP that no longer matches stops it before anything is changed. Afterwards (the moves
and rewrites are staged; ``git reset --hard && git clean -fdx dbtunneld`` undoes them)::

    PYTHONPATH=$PWD .venv/bin/python -m mypy --config-file setup.cfg
    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_layers.py tests/test_headless.py tests/test_packaging.py \
        tests/test_autostart.py tests/test_sandbox.py tests/test_flow.py tests/test_daemon.py tests/test_doctor.py
    ./dev test --fast
    git commit -m "Layers as sub-packages ..."     # the move as a commit of its own
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "dbtunneld"
LAYERS_FILE = "tests/test_layers.py"

PACKAGES = {0: "core", 1: "adapters", 2: "engine", 3: "process", 4: "ui"}
STAY = {"__init__", "__main__", "sandbox"}          # top-level entries that keep their place
DATA_DIRS = {"icons", "templates", "__pycache__"}   # package data, not modules
TEXT_SUFFIXES = {".py", ".cfg", ".toml", ".md", ".txt", ".in", ".sh", ".spec", ".ini", ".rst", ".yml", ".yaml", ""}
FILE_NAMES_LIKE_MODULES = {"dbtunneld.log"}       # a quoted "dbtunneld.log" is the log file, not dbtunneld/log.py
SELF = "tools/relayout.py"

DOCSTRINGS = {
    "core": """Layer 0, vocabulary: errors, the data model, timing maths, config parsing, paths, exit codes.

Pure definitions every other layer shares. May import only the standard library and each other.
""",
    "adapters": """Layer 1, adapters: one module per outside system or wire format (AWS, SSO, Vault, SSH, the SSM
data channel in ``ssm/``, the keyring, logging, ports, TLS, the MySQL wire, the forwarding loop).

They translate errors into ``core.errors`` and never retry. May import ``core`` and each other.
""",
    "engine": """Layer 2, engine: the credential chain (keepers, leases, revocation, the credential facade) and the
tunnels (units, the supervisor's reconcile, wiring, status), all owned by one asyncio loop.

May import ``adapters`` and ``core``; never a front-end or a UI toolkit.
""",
    "process": """Layer 3, process: the daemon process and its control socket (protocol, server, client), and
``doctor``'s layer-by-layer checks.

May import ``engine``, ``adapters`` and ``core``; never a front-end or a UI toolkit.
""",
    "ui": """Layer 4, front-ends: the command line, the tray and its menu model, the setup window
(``onboarding/``), clipboard, notifications and start-at-login.

May import every layer below; the only layer that imports UI toolkits (pystray, Pillow, Xlib, GTK,
tkinter, AppKit) and the only one allowed to start the sandbox (``cli``).
""",
}


class PlanError(SystemExit):
    pass


# ---- the plan --------------------------------------------------------------------------------

def read_layers(root: Path) -> dict[int, set[str]]:
    tree = ast.parse((root / LAYERS_FILE).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LAYERS" for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, dict) and all(isinstance(v, set) for v in value.values()):
                return value
    raise PlanError(f"{LAYERS_FILE}: no LAYERS = {{rank: {{module, ...}}}} found (already relaid out?)")


def top_level_entries(root: Path) -> list[str]:
    names = []
    for path in sorted((root / PKG).iterdir()):
        if path.suffix == ".py":
            names.append(path.stem)
        elif path.is_dir() and path.name not in DATA_DIRS and (path / "__init__.py").exists():
            names.append(path.name)
    return [n for n in names if n not in STAY]


def place_by_sibling(name: str, placed: dict[str, str]) -> str | None:
    stem = name.split("_")[0]
    homes = {pkg for other, pkg in placed.items() if other == stem or other.startswith(stem + "_")}
    return homes.pop() if len(homes) == 1 else None


def place_modules(root: Path) -> dict[str, str]:
    """module name -> layer package, for every top-level module; exits listing what it cannot place."""
    rank = {name: r for r, names in read_layers(root).items() for name in names}
    unknown_ranks = sorted({r for r in rank.values() if r not in PACKAGES})
    if unknown_ranks:
        raise PlanError(f"{LAYERS_FILE}: LAYERS has ranks {unknown_ranks}; PACKAGES knows {sorted(PACKAGES)}")
    entries = top_level_entries(root)
    placed = {n: PACKAGES[rank[n]] for n in entries if n in rank}
    unplaced = []
    for name in entries:
        if name not in placed:
            home = place_by_sibling(name, placed)
            if home is None:
                unplaced.append(name)
            else:
                placed[name] = home
    if unplaced:
        raise PlanError("cannot place these modules (add them to LAYERS in tests/test_layers.py, or give "
                        f"them a sibling's prefix): {', '.join(unplaced)}")
    return placed


@dataclass
class Plan:
    placed: dict[str, str]                       # module -> layer package
    modules: dict[str, str] = field(default_factory=dict)   # old dotted -> new dotted
    paths: dict[str, str] = field(default_factory=dict)     # old path -> new path (files and dirs)

    @classmethod
    def build(cls, root: Path) -> "Plan":
        plan = cls(place_modules(root))
        for name, pkg in sorted(plan.placed.items()):
            plan.modules[f"{PKG}.{name}"] = f"{PKG}.{pkg}.{name}"
            is_dir = (root / PKG / name).is_dir()
            old = f"{PKG}/{name}" + ("" if is_dir else ".py")
            plan.paths[old] = f"{PKG}/{pkg}/{name}" + ("" if is_dir else ".py")
        return plan

    def new_module(self, dotted: str) -> str:
        for old, new in self.modules.items():
            if dotted == old or dotted.startswith(old + "."):
                return new + dotted[len(old):]
        return dotted

    def new_path(self, path: str) -> str:
        for old, new in self.paths.items():
            if path == old or path.startswith(old + "/"):
                return new + path[len(old):]
        return path


# ---- rewriting references ------------------------------------------------------------------

def mention_pattern(plan: Plan) -> re.Pattern[str]:
    names = sorted(plan.placed, key=len, reverse=True)
    return re.compile(r"(?<![\w./])" + PKG + r"([./])(" + "|".join(map(re.escape, names)) + r")(?![\w])")


def rewrite_mentions(text: str, plan: Plan, pattern: re.Pattern[str]) -> str:
    """``dbtunneld.x``, ``dbtunneld/x`` and (in prose: docstrings, README) ``from dbtunneld import x``."""
    names = "|".join(map(re.escape, sorted(plan.placed, key=len, reverse=True)))
    text = re.sub(rf"(?<![\w.])from {PKG} import ({names})(?![\w,])",
                  lambda m: f"from {PKG}.{plan.placed[m.group(1)]} import {m.group(1)}", text)

    def sub(m: re.Match[str]) -> str:
        before, after = text[m.start() - 1:m.start()], text[m.end():m.end() + 1]
        if m.group(0) in FILE_NAMES_LIKE_MODULES and before in "\"'`" and after in "\"'`" and before:
            return m.group(0)
        if m.group(1) == "/" and after == "." and not text.startswith(".py", m.end()):
            return m.group(0)                     # dbtunneld/config.toml is a file name, not the module
        return f"{PKG}{m.group(1)}{plan.placed[m.group(2)]}{m.group(1)}{m.group(2)}"
    return pattern.sub(sub, text)


def module_of(path: str) -> list[str] | None:
    """The package a file inside dbtunneld/ belongs to, as parts (its folder); None outside it."""
    parts = path.split("/")
    return parts[:-1] if parts[0] == PKG else None


def relative_form(target: str, package: list[str]) -> str:
    parts = target.split(".")
    common = 0
    while common < min(len(parts), len(package)) and parts[common] == package[common]:
        common += 1
    return "." * (len(package) - common + 1) + ".".join(parts[common:])


def _alias(a: ast.alias) -> str:
    return a.name if a.asname is None else f"{a.name} as {a.asname}"


def _offsets(text: str) -> list[int]:
    starts, pos = [], 0
    for line in text.splitlines(keepends=True):
        starts.append(pos)
        pos += len(line)
    return starts + [pos]


def _char_offset(text: str, starts: list[int], line: int, col_bytes: int) -> int:
    start = starts[line - 1]
    line_text = text[start:starts[line]] if line < len(starts) else text[start:]
    return start + len(line_text.encode()[:col_bytes].decode())


def rewrite_from_import(node: ast.ImportFrom, segment: str, old_pkg: list[str] | None,
                        new_pkg: list[str] | None, plan: Plan, indent: str) -> str | None:
    """The new text of one ``from X import ...`` statement, or None to leave it alone."""
    if node.level and old_pkg is None:
        return None
    if node.level:
        base = old_pkg[:len(old_pkg) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target != PKG and not target.startswith(PKG + "."):
        return None
    groups: dict[str, list[ast.alias]] = {}
    for alias in node.names:
        full = plan.new_module(f"{target}.{alias.name}")
        moved_module = full != f"{target}.{alias.name}" and f"{target}.{alias.name}" in plan.modules
        source = full.rsplit(".", 1)[0] if moved_module else plan.new_module(target)
        groups.setdefault(source, []).append(alias)

    def spelled(source: str) -> str:
        return relative_form(source, new_pkg) if node.level else source

    original = re.match(r"from\s+(\.*[\w.]*)\s+import\b", segment)
    if len(groups) == 1:
        (source,) = groups
        if original is None or spelled(source) == original.group(1):
            return None
        return segment[:original.start(1)] + spelled(source) + segment[original.end(1):]
    return indent.join(f"from {spelled(src)} import {', '.join(map(_alias, names))}" for src, names in groups.items())


def rewrite_python(text: str, rel_path: str, plan: Plan, pattern: re.Pattern[str]) -> str:
    tree = ast.parse(text, rel_path)
    old_pkg, new_pkg = module_of(rel_path), module_of(plan.new_path(rel_path))
    starts = _offsets(text)
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        begin = _char_offset(text, starts, node.lineno, node.col_offset)
        end = _char_offset(text, starts, node.end_lineno, node.end_col_offset)
        line_start = starts[node.lineno - 1]
        lead = text[line_start:begin]
        indent = "\n" + lead if not lead.strip() else "; "
        new = rewrite_from_import(node, text[begin:end], old_pkg, new_pkg, plan, indent)
        edits.append((begin, end, new))
    out, pos = [], 0
    for begin, end, new in sorted(edits):
        out.append(rewrite_mentions(text[pos:begin], plan, pattern))
        out.append(text[begin:end] if new is None else new)
        pos = end
    out.append(rewrite_mentions(text[pos:], plan, pattern))
    new = "".join(out)
    return sort_import_runs(new) if new != text else text


ONE_LINE_IMPORT = re.compile(rf"^([ \t]*)from (\.+\w*|{PKG}\b)[\w.]* import [^(\\#\n]*$")


def sort_import_runs(text: str) -> str:
    """Sort each run of adjacent one-line ``from`` imports of the package (same indent), as they
    were before their module paths changed: parents before siblings, then alphabetically."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = ONE_LINE_IMPORT.match(lines[i])
        j = i + 1
        while m and j < len(lines) and (n := ONE_LINE_IMPORT.match(lines[j])) and n.group(1) == m.group(1) \
                and n.group(2).startswith(".") == m.group(2).startswith("."):
            j += 1
        if j - i > 1:
            lines[i:j] = sorted(lines[i:j], key=_import_order)
        i = j
    return "\n".join(lines)


def _import_order(line: str) -> tuple[int, str]:
    module = line.strip().split(" ")[1]
    dots = len(module) - len(module.lstrip("."))
    return -dots, module.lstrip(".")


# ---- places that compute module names (checked: each must match exactly once) --------------

FIXUPS: list[tuple[str, str, str]] = [
    ("tests/test_headless.py",
     'from test_layers import LAYERS\n',
     'from test_layers import modules_below\n'),
    ("tests/test_headless.py",
     'for m in sorted(n for rank, names in LAYERS.items() if rank < 4 for n in names if n != "__init__"):\n'
     '    importlib.import_module("dbtunneld." + m)\n',
     'for m in modules_below(4):\n'
     '    importlib.import_module(m)\n'),
    ("tests/test_autostart.py",
     '<= {"dbtunneld", "dbtunneld.core.errors", "dbtunneld.core.paths"}',
     '<= {"dbtunneld", "dbtunneld.ui", "dbtunneld.core",\n'
     '                                                                         "dbtunneld.core.errors", "dbtunneld.core.paths"}'),
]


def apply_fixups(root: Path, changed: dict[str, str]) -> None:
    """Apply FIXUPS to the rewritten texts in ``changed`` (in memory, before anything is written)."""
    for rel, old, new in FIXUPS:
        text = changed.get(rel) or (root / rel).read_text()
        if text.count(old) != 1:
            raise PlanError(f"{rel}: expected exactly one {old!r} to fix up (the file changed: update FIXUPS "
                            "in tools/relayout.py); nothing was changed")
        changed[rel] = text.replace(old, new)


# ---- new files -----------------------------------------------------------------------------

def write_package_inits(root: Path, plan: Plan) -> None:
    for pkg in sorted(set(plan.placed.values())):
        init = root / PKG / pkg / "__init__.py"
        init.parent.mkdir(exist_ok=True)
        init.write_text(f'"""{DOCSTRINGS[pkg]}"""\n')


def write_contracts(root: Path) -> None:
    """import-linter contracts in setup.cfg (tests/test_layers.py runs them)."""
    path = root / "setup.cfg"
    text = re.sub(r"\n\[importlinter[^\]]*\][^\[]*", "\n", path.read_text())
    text = re.sub(r"import-linter>=[\d.]+(,<[\d.]+)?", "import-linter>=2.17,<3", text)   # tested with 2.17
    path.write_text(text.rstrip("\n") + "\n\n" + CONTRACTS)


def update_readme(root: Path, plan: Plan) -> None:
    """The layer table in README.md lists the sub-packages and their modules."""
    path = root / "README.md"
    text = path.read_text()
    block = re.search(r"```\nvocabulary .*?\n```\n", text, re.S)
    if block is None:
        print("relayout: README.md has no layer table starting with 'vocabulary'; left alone", file=sys.stderr)
        return
    titles = {0: "vocabulary", 1: "adapters", 2: "engine", 3: "process", 4: "front-ends"}
    rows = []
    for rank, pkg in PACKAGES.items():
        names = sorted(n + ("/" if (root / PKG / pkg / n).is_dir() else "") for n, p in plan.placed.items() if p == pkg)
        rows += _wrapped(f"{titles[rank]:<11} {PKG}/{pkg + '/':<10} ", names)
    rows.append(f"{'demo':<11} {PKG}/sandbox/  (the local stack; product code never imports it)")
    text = text.replace(block.group(0), "```\n" + "\n".join(rows) + "\n```\n")
    if text.count(README_ENFORCED_BY) != 1:
        print("relayout: README.md: the sentence on what enforces the layers changed; left alone", file=sys.stderr)
    path.write_text(text.replace(README_ENFORCED_BY, README_ENFORCED_NOW))


README_ENFORCED_BY = """Imports point down only, and nothing below the front-ends imports a UI toolkit:
`tests/test_layers.py` enforces both. """
README_ENFORCED_NOW = """Each layer is a sub-package (its `__init__.py` says what it holds and may
import). Imports point down only, nothing below the front-ends imports a UI toolkit, and only
`ui/cli.py` starts the sandbox: import-linter contracts in `setup.cfg`, run by `tests/test_layers.py`
(`tools/relayout.py` made this layout from the flat package).
"""


def _wrapped(head: str, names: list[str], width: int = 100) -> list[str]:
    lines, line = [], head
    for name in names:
        if len(line) + len(name) + 2 > width and line.strip() != head.strip():
            lines.append(line.rstrip(", ") + ",")
            line = " " * len(head)
        line += name + ", "
    return lines + [line.rstrip(", ")]


# ---- the move --------------------------------------------------------------------------------

def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def tracked_text_files(root: Path) -> list[str]:
    files = []
    for rel in git(root, "ls-files").splitlines():
        path = root / rel
        if rel == SELF or not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        try:
            path.read_text()
        except UnicodeDecodeError:
            continue
        files.append(rel)
    return files


def refuse_if_done_or_dirty(root: Path, dry_run: bool) -> None:
    done = [p for p in PACKAGES.values() if (root / PKG / p / "__init__.py").exists()]
    if done:
        raise PlanError(f"already relaid out: {', '.join(PKG + '/' + p for p in done)} exist(s); nothing to do")
    if not dry_run and git(root, "status", "--porcelain", "--untracked-files=no").strip():
        raise PlanError("the work tree has uncommitted changes; commit them first so the move is a commit of its own")


def rewrite_all(root: Path, plan: Plan) -> list[str]:
    pattern = mention_pattern(plan)
    changed = {}
    for rel in tracked_text_files(root):            # everything in memory first: a failure changes nothing
        text = (root / rel).read_text()
        new = rewrite_python(text, rel, plan, pattern) if rel.endswith(".py") else rewrite_mentions(text, plan, pattern)
        if new != text:
            changed[rel] = new
    apply_fixups(root, changed)
    for rel, new in changed.items():
        (root / rel).write_text(new)
    return sorted(changed)


def move_files(root: Path, plan: Plan) -> None:
    for pkg in sorted(set(plan.placed.values())):
        (root / PKG / pkg).mkdir(exist_ok=True)   # an untracked __pycache__ may be there
    for old, new in plan.paths.items():
        git(root, "mv", old, new)
        leftover = root / old
        if leftover.is_dir():                     # only untracked __pycache__ can be left
            shutil.rmtree(leftover)


def print_plan(root: Path, plan: Plan) -> None:
    for pkg in PACKAGES.values():
        names = sorted(n for n, p in plan.placed.items() if p == pkg)
        print(f"{PKG}/{pkg}/  ({len(names)}): {', '.join(names)}")
    layers = read_layers(root)
    guessed = sorted(n for n in plan.placed if not any(n in names for names in layers.values()))
    if guessed:
        print(f"placed by sibling prefix (not in LAYERS): {', '.join(guessed)}")
    files = [rel for rel in tracked_text_files(root) if mention_pattern(plan).search((root / rel).read_text())
             or (rel.startswith(PKG + "/") and rel.endswith(".py"))]
    print(f"files to check and rewrite: {len(files)}; plus {LAYERS_FILE}, setup.cfg [importlinter], README.md layer table")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    refuse_if_done_or_dirty(root, args.dry_run)
    plan = Plan.build(root)
    print_plan(root, plan)
    if args.dry_run:
        return 0
    changed = rewrite_all(root, plan)
    move_files(root, plan)
    write_package_inits(root, plan)
    (root / LAYERS_FILE).write_text(TEST_LAYERS)
    write_contracts(root)
    update_readme(root, plan)
    git(root, "add", "-A", "--", PKG, "tests", "setup.cfg", "README.md", *[r for r in changed if (root / r).exists()])
    print(f"moved {len(plan.paths)} modules, rewrote references in {len(changed)} files; now run the checks "
          "(see tools/relayout.py's docstring) and commit")
    return 0


CONTRACTS = """\
# Import contracts (import-linter), run by tests/test_layers.py. The five layers are the five
# sub-packages; every module lives in one (exhaustive), imports point down only.
[importlinter]
root_package = dbtunneld
include_external_packages = True

[importlinter:contract:layers]
name = Imports point down only: ui -> process -> engine -> adapters -> core
type = layers
containers = dbtunneld
layers =
    ui
    process
    engine
    adapters
    core
exhaustive = True
exhaustive_ignores =
    __main__
    sandbox

[importlinter:contract:no-ui-toolkit-below-front-ends]
name = No UI toolkit below the front-ends
type = forbidden
source_modules =
    dbtunneld.core
    dbtunneld.adapters
    dbtunneld.engine
    dbtunneld.process
forbidden_modules =
    pystray
    PIL
    gi
    Xlib
    tkinter
    AppKit
    objc
allow_indirect_imports = False

[importlinter:contract:sandbox-only-from-cli]
name = Product code never imports the sandbox (only `dbtunneld sandbox` in ui.cli may)
type = forbidden
source_modules =
    dbtunneld.core
    dbtunneld.adapters
    dbtunneld.engine
    dbtunneld.process
    dbtunneld.ui
forbidden_modules =
    dbtunneld.sandbox
ignore_imports =
    dbtunneld.ui.cli -> dbtunneld.sandbox.cli
"""

TEST_LAYERS = '''"""The layers of DESIGN.md, as sub-packages of dbtunneld, enforced by import-linter (contracts in setup.cfg).

core (vocabulary) -> adapters -> engine -> process -> ui (front-ends). A module's layer is its
sub-package; it may import its own layer and the ones below. Every module lives in a layer package
(only ``__main__`` and ``sandbox/`` stay at the top), no UI toolkit is imported below the
front-ends, and only ``ui.cli`` starts the sandbox.
"""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dbtunneld"
LAYERS = {0: "core", 1: "adapters", 2: "engine", 3: "process", 4: "ui"}
TOP_LEVEL = {"__init__", "__main__", "sandbox"}


def modules_below(rank: int, root: Path = PKG) -> list[str]:
    """Dotted names of every module in the layers under ``rank`` (the headless test imports them)."""
    names = []
    for r in range(rank):
        for path in sorted((root / LAYERS[r]).rglob("*.py")):
            parts = path.relative_to(root.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def lint_imports(cfg: Path, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_layers_are_sub_packages():
    stray = sorted(p.name for p in PKG.iterdir() if p.suffix == ".py" and p.stem not in TOP_LEVEL)
    assert not stray, f"move these modules into a layer package ({', '.join(LAYERS.values())}): {stray}"
    for rank, name in LAYERS.items():
        doc = ast.get_docstring(ast.parse((PKG / name / "__init__.py").read_text())) or ""
        assert doc.startswith(f"Layer {rank}, "), f"dbtunneld/{name}/__init__.py: the docstring names its layer"


def test_import_contracts_hold():
    """Every module is in a layer, imports point down only, no UI toolkit below the front-ends."""
    proc = lint_imports(ROOT / "setup.cfg", ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 3 kept, 0 broken." in proc.stdout, proc.stdout


def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            if str(parent) != ".":
                (root / parent / "__init__.py").touch()
        path.write_text(text)


def test_the_contracts_find_planted_violations(tmp_path):
    """The same contracts on a planted package: an upward import, a UI import, a sandbox import and
    a module outside the layers must each break a contract."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    planted = configparser.ConfigParser()
    for section in (s for s in cfg.sections() if s.startswith("importlinter")):
        planted[section] = {k: v.replace("dbtunneld", "planted") for k, v in cfg[section].items()}
    with open(tmp_path / ".importlinter", "w") as f:
        planted.write(f)
    _plant(tmp_path, {
        "planted/__main__.py": "from .ui import cli\\n",
        "planted/core/model.py": "",
        "planted/adapters/ssm/client.py": "from ...engine.supervisor import Supervisor\\nimport pystray\\n",
        "planted/engine/supervisor.py": "from ..core import model\\n",
        "planted/engine/tunnel.py": "from ..ui.tray import run\\n",
        "planted/engine/credentials.py": "from planted.sandbox import stack\\n",
        "planted/process/daemon.py": "",
        "planted/ui/tray.py": "from ..process import daemon\\n",
        "planted/ui/cli.py": "from ..sandbox.cli import run_sandbox\\n",
        "planted/sandbox/cli.py": "from ..process import daemon\\n",
        "planted/sandbox/stack.py": "",
        "planted/stray.py": "",
    })
    out = lint_imports(tmp_path / ".importlinter", tmp_path, tmp_path).stdout
    assert "Contracts: 0 kept, 3 broken." in out, out
    for expected in ("planted.engine.tunnel -> planted.ui.tray", "planted.adapters.ssm.client -> planted.engine.supervisor",
                     "planted.stray", "planted.adapters.ssm.client -> pystray",
                     "planted.engine.credentials -> planted.sandbox"):
        assert expected in out, (expected, out)
    assert "planted.ui.cli -> planted.sandbox" not in out, out


# ---- one definition of shared vocabulary (issue 15, point 8) ---------------------------------

WIRE_PROTOCOL_PACKAGES = {"adapters/ssm"}   # ssm/message.py's EXIT_CODE is an SSM payload type, not an exit code


def _assigned_names(node: ast.AST) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    names = []
    for t in targets:
        names += [e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)]
    return names


def _product_files(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith("sandbox/") and not any(rel.startswith(p + "/") for p in WIRE_PROTOCOL_PACKAGES):
            yield rel, path


def shared_definitions(root: Path = PKG) -> tuple[list[str], list[str]]:
    """(modules that give an EXIT_* name an int literal, modules that define class DbCredentials)."""
    exits, creds = [], []
    for rel, path in _product_files(root):
        for node in ast.parse(path.read_text(), rel).body:
            if isinstance(node, ast.ClassDef) and node.name == "DbCredentials":
                creds.append(rel)
            value = getattr(node, "value", None)
            literal = value is not None and any(isinstance(n, ast.Constant) and type(n.value) is int
                                                for n in ast.walk(value))
            if literal and any(n.startswith("EXIT_") for n in _assigned_names(node)):
                exits.append(rel)
    return sorted(set(exits)), creds


def test_exit_codes_and_db_credentials_are_defined_once():
    exits, creds = shared_definitions()
    assert exits == ["core/exitcodes.py"], f"exit codes defined outside dbtunneld/core/exitcodes.py: {exits}"
    assert creds == ["core/model.py"], f"DbCredentials defined in {creds}; import it from dbtunneld.core.model"


def test_the_single_definition_check_finds_copies(tmp_path):
    _plant(tmp_path, {"ui/cli.py": "EXIT_OK, EXIT_FAIL = 0, 1\\n",
                      "process/daemon.py": "from ..core.exitcodes import EXIT_OK\\nEXIT_ALIAS = EXIT_OK\\n",
                      "engine/credentials.py": "class DbCredentials:\\n    pass\\n",
                      "adapters/ssm/message.py": "EXIT_CODE = 12\\n"})
    assert shared_definitions(tmp_path) == (["ui/cli.py"], ["engine/credentials.py"])
'''

if __name__ == "__main__":
    try:
        sys.exit(main())
    except PlanError as exc:
        print(f"relayout: {exc.code}", file=sys.stderr)
        sys.exit(2)
