"""The layers of DESIGN.md, enforced: imports point down only, and no UI toolkit below the front-ends.

vocabulary -> adapters -> engine -> process -> front-ends. A module may import its own layer and
the ones below. Every module must be classified here, so a new one is placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dbtunneld"

LAYERS = {
    0: {"__init__", "errors", "model", "timing", "config", "config_schema", "config_reader", "config_sections", "paths",
        "exitcodes"},
    1: {"aws", "sso", "vault", "iam_login", "ssm", "ssh", "ssh_options", "ssh_hostkeys", "ssh_auth", "ssh_channel",
        "paramiko_internals", "openssh_mux", "openssh_transport", "keystore", "log", "discovery", "ports", "transport", "tls",
        "inventory", "catalog", "forward", "mysqlwire", "local_tls", "command_watch", "upstream_tls"},
    2: {"credentials", "lease_keeper", "lease_store", "orphans", "units", "wiring", "login_probe",
        "status_publisher", "engine_loop", "workers", "cluster_slots", "scheduler", "wake", "own_schedule", "tunnel_state",
        "tunnel_health", "tunnel_clients", "keeper", "token_keeper", "sso_keeper", "sso_signin", "tunnel", "supervisor",
        "aurora", "wanted", "revoke", "local_login"},
    3: {"protocol", "control", "control_socket", "event_bus", "client", "daemon", "doctor"},
    4: {"cli", "cli_commands", "cli_output", "menu", "tray", "tray_desktop", "tray_funnel", "tray_app", "tray_actions",
        "tray_pystray", "tray_darwin", "clipboard", "notify", "autostart", "autostart_common",
        "autostart_launchd", "autostart_xdg", "autostart_systemd", "autostart_windows", "__main__", "onboarding"},
}
RANK = {name: rank for rank, names in LAYERS.items() for name in names}
UI_PACKAGES = {"pystray", "PIL", "gi", "Xlib", "tkinter", "AppKit", "objc"}
SANDBOX = "sandbox"


def _top(module_path: Path, root: Path = PKG) -> str:
    rel = module_path.relative_to(root)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path, root: Path = PKG) -> list[tuple[str, int]]:
    """(dotted module name, line) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package_parts = ("dbtunneld",) + path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                if not node.module:
                    found += [(".".join(base + [a.name]), node.lineno) for a in node.names]
                    continue
                mod = ".".join(base + [node.module])
            found.append((mod, node.lineno))
    return found


def _files(root: Path):
    for path in sorted(root.rglob("*.py")):
        if _top(path, root) != SANDBOX:
            yield path


def upward_imports(root: Path = PKG) -> list[str]:
    violations = []
    for path in _files(root):
        me = _top(path, root)
        for name, line in _imports(path, root):
            parts = name.split(".")
            if parts[0] != "dbtunneld" or len(parts) < 2:
                continue
            target = parts[1]
            if target == SANDBOX:
                if me != "cli":
                    violations.append(f"{path.name}:{line} imports the sandbox (only `dbtunneld sandbox` in cli may)")
            elif target in RANK and RANK[target] > RANK.get(me, 0):
                violations.append(f"{path.relative_to(root)}:{line}: {me} (layer {RANK[me]}) imports {target} (layer {RANK[target]})")
    return violations


def ui_imports_below_front_ends(root: Path = PKG) -> list[str]:
    violations = []
    for path in _files(root):
        if RANK.get(_top(path, root), 0) >= 4:
            continue
        for name, line in _imports(path, root):
            if name.split(".")[0] in UI_PACKAGES:
                violations.append(f"{path.relative_to(root)}:{line} imports {name}")
    return violations


def test_every_module_is_placed_in_a_layer():
    unplaced = {_top(p) for p in _files(PKG)} - set(RANK)
    assert not unplaced, f"classify these modules in tests/test_layers.py LAYERS: {sorted(unplaced)}"


def test_imports_point_down_only():
    violations = upward_imports()
    assert not violations, "\n".join(violations)


def test_no_ui_toolkit_below_front_ends():
    violations = ui_imports_below_front_ends()
    assert not violations, "\n".join(violations)


def test_the_checker_finds_planted_violations(tmp_path):
    """The checks must be able to fail: plant an upward import, a UI import and a sandbox import."""
    (tmp_path / "ssm").mkdir()
    (tmp_path / "tunnel.py").write_text("from .tray import run\nfrom dbtunneld import model\n")
    (tmp_path / "ssm" / "client.py").write_text("from ..supervisor import Supervisor\nimport pystray\n")
    (tmp_path / "credentials.py").write_text("from dbtunneld.sandbox import stack\nfrom . import vault\n")
    up = upward_imports(tmp_path)
    assert any("tunnel.py:1: tunnel (layer 2) imports tray (layer 4)" in v for v in up), up
    assert any("ssm/client.py:1: ssm (layer 1) imports supervisor (layer 2)" in v for v in up), up
    assert any("credentials.py:1 imports the sandbox" in v for v in up), up
    assert len(up) == 3, up
    assert ui_imports_below_front_ends(tmp_path) == ["ssm/client.py:2 imports pystray"]


# ---- one definition of shared vocabulary (issue 15, point 8) ---------------------------------

WIRE_PROTOCOL_PACKAGES = {"ssm"}      # ssm/message.py's EXIT_CODE is an SSM payload type, not an exit code


def _assigned_names(node: ast.AST) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    names = []
    for t in targets:
        names += [e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)]
    return names


def shared_definitions(root: Path = PKG) -> tuple[list[str], list[str]]:
    """(modules that give an EXIT_* name an int literal, modules that define class DbCredentials)."""
    exits, creds = [], []
    for path in _files(root):
        if _top(path, root) in WIRE_PROTOCOL_PACKAGES:
            continue
        rel = str(path.relative_to(root))
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
    assert exits == ["exitcodes.py"], f"exit codes defined outside dbtunneld/exitcodes.py: {exits}"
    assert creds == ["model.py"], f"DbCredentials defined in {creds}; import it from dbtunneld.model"


def test_the_single_definition_check_finds_copies(tmp_path):
    (tmp_path / "cli.py").write_text("EXIT_OK, EXIT_FAIL = 0, 1\n")
    (tmp_path / "daemon.py").write_text("from .exitcodes import EXIT_OK\nEXIT_ALIAS = EXIT_OK\n")
    (tmp_path / "credentials.py").write_text("class DbCredentials:\n    pass\n")
    assert shared_definitions(tmp_path) == (["cli.py"], ["credentials.py"])
