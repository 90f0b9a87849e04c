"""The layers of DESIGN.md, as sub-packages of dbtunneld, enforced by import-linter (contracts in setup.cfg).

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
        "planted/__main__.py": "from .ui import cli\n",
        "planted/core/model.py": "",
        "planted/adapters/ssm/client.py": "from ...engine.supervisor import Supervisor\nimport pystray\n",
        "planted/engine/supervisor.py": "from ..core import model\n",
        "planted/engine/tunnel.py": "from ..ui.tray import run\n",
        "planted/engine/credentials.py": "from planted.sandbox import stack\n",
        "planted/process/daemon.py": "",
        "planted/ui/tray.py": "from ..process import daemon\n",
        "planted/ui/cli.py": "from ..sandbox.cli import run_sandbox\n",
        "planted/sandbox/cli.py": "from ..process import daemon\n",
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
    _plant(tmp_path, {"ui/cli.py": "EXIT_OK, EXIT_FAIL = 0, 1\n",
                      "process/daemon.py": "from ..core.exitcodes import EXIT_OK\nEXIT_ALIAS = EXIT_OK\n",
                      "engine/credentials.py": "class DbCredentials:\n    pass\n",
                      "adapters/ssm/message.py": "EXIT_CODE = 12\n"})
    assert shared_definitions(tmp_path) == (["ui/cli.py"], ["engine/credentials.py"])
