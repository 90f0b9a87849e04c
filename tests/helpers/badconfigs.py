"""Generated bad configs: deterministic mutations of one good config, each known to be invalid.

``generate(n, seed)`` yields ``BadConfig(text, what, expect)``: the TOML text (or bytes, for
encoding faults), a one-line description of the mutations, and the key paths a clear error must
name (``""`` means "a file-level problem", e.g. broken TOML). Mutations: wrong types, unknown keys
(typos and strangers), out-of-range ports and numbers, duplicate cluster names and ports, missing
sections and keys, sections of the wrong kind, bad values (URLs, regions, transports, names,
files), and broken TOML text (unterminated strings, duplicate keys, stray brackets, bad bytes).
Structured mutations edit the parsed document and write it back with a small TOML writer.
"""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

GOOD: dict[str, Any] = {
    "aws": {"profile": "dev-sso", "region": "eu-west-1",
            "endpoint_urls": {"sts": "https://sts.eu-west-1.amazonaws.com"}},
    "vault": {"address": "https://vault.example.com:8200", "role": "db-developer",
              "auth_mount": "aws", "iam_server_id": "vault.example.com", "database_mount": "database",
              "timeout": 10.0},
    "bastion": {"transport": "ssh", "host": "bastion.example.com", "port": 22, "user": "ec2-user",
                "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBd2dW1teWtleWZvcnRlc3RzMTIzNDU2Nzg5MA"},
    "credentials": {"mint_ahead": 600.0, "revoke_timeout": 10.0},
    "tunnels": {"port_range": [13306, 13399], "connect_wait": 20.0, "health_interval": 30.0,
                "health_timeout": 5.0, "keepalive_interval": 5.0, "backoff_initial": 0.5, "backoff_max": 30.0},
    "ui": {"clipboard_clear_seconds": 30.0, "notifications": True},
    "clusters": [
        {"name": "orders", "endpoint": "orders.cluster-abc.eu-west-1.rds.amazonaws.com", "port": 3306,
         "local_port": 13306, "db_role": "orders-ro", "database": "orders", "autoconnect": True},
        {"name": "billing", "endpoint": "billing.cluster-abc.eu-west-1.rds.amazonaws.com",
         "local_port": 13307, "db_role": "billing-rw", "production": True},
        {"name": "audit", "endpoint": "audit.cluster-abc.eu-west-1.rds.amazonaws.com", "db_role": "audit-ro"},
    ],
}

FLOAT_KEYS = {"timeout", "mint_ahead", "revoke_timeout", "connect_wait", "health_interval", "health_timeout",
              "keepalive_interval", "backoff_initial", "backoff_max", "clipboard_clear_seconds"}
PORT_KEYS = ("port", "local_port")


@dataclass
class BadConfig:
    text: str | bytes
    what: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)    # key paths; "" = file-level


# ---------------------------------------------------------------------------- a small TOML writer

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dump(doc: dict[str, Any]) -> str:
    """TOML text for ``doc``: scalars first, then [tables] and [[arrays of tables]]."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not isinstance(v, dict) and not _is_table_list(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{_key(k)}]"] + [f"{_key(a)} = {_value(b)}" for a, b in v.items()]
        elif _is_table_list(v):
            for item in v:
                lines += ["", f"[[{_key(k)}]]"] + [f"{_key(a)} = {_value(b)}" for a, b in item.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- document paths

def leaves(doc: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(key path as the config reports it, container, key) for every scalar/list/inline value."""
    out = []
    for section, body in doc.items():
        if isinstance(body, dict):
            out += [(f"{section}.{k}", body, k) for k in body]
        elif _is_table_list(body):
            for i, item in enumerate(body):
                out += [(f"{section}[{i}].{k}", item, k) for k in item]
    return out


def _other_type(rnd: random.Random, current: Any, key: str) -> Any:
    candidates: list[Any] = [42, -7, "text", True, False, 1.5, [1, 2], ["a"], {"a": 1}, {}]
    def same(v: Any) -> bool:
        if isinstance(current, bool) or isinstance(v, bool):
            return type(v) is type(current)
        if key in FLOAT_KEYS and isinstance(v, (int, float)):
            return True
        return type(v) is type(current)
    return rnd.choice([c for c in candidates if not same(c)])


# ---------------------------------------------------------------------------- structured mutations

Mutation = Callable[[random.Random, dict[str, Any]], tuple[str, str]]


def wrong_type(rnd, doc):
    path, box, key = rnd.choice(leaves(doc))
    value = _other_type(rnd, box[key], key)
    if key in ("tags", "endpoint_urls") and isinstance(value, dict):
        value = {"x": 1}                     # a table of the wrong value type
        path = f"{path}.x"
    box[key] = value
    return f"{path} = {_value(value)}", path


TYPO_KEYS = ["adress", "profil", "regoin", "local-port", "localport", "db-role", "endpiont", "trasnport",
             "hostkey", "keepalive", "connect_timeout", "ttl", "password", "token", "Name", "PORT", "ssl",
             "retries", "x", "üñí", "with space", "1"]


def unknown_key(rnd, doc):
    tables = [(s, b) for s, b in doc.items() if isinstance(b, dict)]
    tables += [(f"clusters[{i}]", c) for i, c in enumerate(doc["clusters"])]
    where, table = rnd.choice(tables + [("", doc)])
    name = rnd.choice([k for k in TYPO_KEYS if k not in table])
    table[name] = rnd.choice(["value", 1, True, {"a": "b"}, [1]])
    path = f"{where}.{name}" if where else name
    return f"unknown key {path}", path


BAD_PORTS = [0, -1, 65536, 99999, 2 ** 31, 2 ** 63 - 1, -65535]


def port_out_of_range(rnd, doc):
    i = rnd.randrange(len(doc["clusters"]))
    choice = rnd.choice(["bastion.port", "port", "local_port", "local_port_low"])
    if choice == "bastion.port":
        doc["bastion"]["port"] = value = rnd.choice(BAD_PORTS)
        return f"bastion.port = {value}", "bastion.port"
    key = "local_port" if choice.startswith("local") else "port"
    value = rnd.choice([1, 22, 80, 443, 1023]) if choice == "local_port_low" else rnd.choice(BAD_PORTS)
    doc["clusters"][i][key] = value
    return f"clusters[{i}].{key} = {value}", f"clusters[{i}].{key}"


BAD_RANGES = [[0, 10], [70000, 70001], [13399, 13306], [13306], [], [1024, "x"], [13306, 13307, 13308],
              [1023, 2000], [True, 2000]]


def bad_port_range(rnd, doc):
    doc["tunnels"]["port_range"] = value = copy.deepcopy(rnd.choice(BAD_RANGES))
    return f"tunnels.port_range = {_value(value)}", "tunnels.port_range"


def duplicate(rnd, doc):
    clusters = doc["clusters"]
    i, j = rnd.sample(range(len(clusters)), 2)
    if rnd.random() < 0.5:
        clusters[j]["name"] = clusters[i]["name"]
        first, second = sorted((i, j))
        return f"duplicate name {clusters[i]['name']!r}", f"clusters[{second}].name"
    port = clusters[i].setdefault("local_port", 13350 + i)
    clusters[j]["local_port"] = port
    return f"duplicate local_port {port}", f"clusters[{max(i, j)}].local_port"


REQUIRED = ["vault.address", "vault.role", "clusters[].name", "clusters[].endpoint", "clusters[].db_role",
            "bastion.host", "vault", "clusters"]


def missing(rnd, doc):
    what = rnd.choice(REQUIRED)
    if what in ("vault", "clusters"):
        del doc[what]
        return f"section {what} removed", what
    if what.startswith("clusters[]"):
        i = rnd.randrange(len(doc["clusters"]))
        key = what.split(".")[1]
        del doc["clusters"][i][key]
        return f"clusters[{i}].{key} removed", f"clusters[{i}].{key}"
    section, key = what.split(".")
    del doc[section][key]
    return f"{what} removed", what


def section_wrong_kind(rnd, doc):
    name = rnd.choice(["aws", "vault", "bastion", "credentials", "tunnels", "ui", "clusters", "clusters[]"])
    value = rnd.choice(["text", 5, [1, 2], True, 1.5])
    if name == "clusters[]":
        i = rnd.randrange(len(doc["clusters"]))
        doc["clusters"] = doc["clusters"][:i] + [value] + doc["clusters"][i + 1:]
        return f"clusters[{i}] = {_value(value)}", f"clusters[{i}]"
    doc[name] = value
    return f"{name} = {_value(value)}", name


BAD_VALUES: list[tuple[str, list[Any]]] = [
    ("vault.address", ["ftp://vault", "vault.example.com", "http://vault.example.com:8200", "https://u:p@v:8200",
                       "https://v:8200/?token=x", "https://", "://", "", "   "]),
    ("vault.role", ["", "  "]),
    ("aws.region", ["moon-1", "EU-WEST-1", "", "eu_west_1", "us-east-1a"]),
    ("aws.endpoint_urls.s3", ["https://s3.example.com"]),
    ("aws.endpoint_urls.sts", ["sts.example.com", "ftp://sts", ""]),
    ("bastion.transport", ["telnet", "", "SSH", "ssm"]),
    ("bastion.key_file", ["/nonexistent/dbtunneld-test/key"]),
    ("bastion.host_key", ["garbage"]),
    ("vault.ca_cert", ["/nonexistent/dbtunneld-test/ca.pem"]),
    ("vault.timeout", [0.0, -1.0, 121.0, float("nan"), float("inf")]),
    ("credentials.mint_ahead", [-1.0, 1e9]),
    ("credentials.revoke_timeout", [0.0, 1000.0]),
    ("tunnels.connect_wait", [-0.5, 301.0, float("-inf")]),
    ("tunnels.health_interval", [0.0, 0.5, 3601.0]),
    ("tunnels.health_timeout", [0.1, 1000.0]),
    ("tunnels.keepalive_interval", [0.0, 601.0]),
    ("tunnels.backoff_initial", [0.0, 61.0]),
    ("tunnels.backoff_max", [0.5, 1e6]),
    ("ui.clipboard_clear_seconds", [-5.0, 3601.0]),
    ("clusters[].name", ["bad name!", "-leading", "a" * 64, "", "ünïcode", "semi;colon"]),
    ("clusters[].endpoint", [""]),
    ("clusters[].db_role", [""]),
    ("clusters[].transport", ["carrier-pigeon", "SSH"]),
]


def bad_value(rnd, doc):
    path, values = rnd.choice(BAD_VALUES)
    value = rnd.choice(values)
    if path.startswith("clusters[]"):
        i = rnd.randrange(len(doc["clusters"]))
        key = path.split(".", 1)[1]
        doc["clusters"][i][key] = value
        path = f"clusters[{i}].{key}"
    elif path.startswith("aws.endpoint_urls."):
        doc["aws"]["endpoint_urls"][path.rsplit(".", 1)[1]] = value
    else:
        section, key = path.split(".")
        doc[section][key] = value
    return f"{path} = {_value(value)}", path


def ssm_without_target(rnd, doc):
    doc["bastion"]["transport"] = rnd.choice(["ssm-ssh", "ssm-port-forward", "plugin"])
    doc["bastion"].pop("host", None)
    return f"bastion.transport {doc['bastion']['transport']} without instance_id/tags", "bastion"


STRUCTURED: list[Mutation] = [wrong_type, wrong_type, unknown_key, unknown_key, port_out_of_range, bad_port_range,
                              duplicate, missing, section_wrong_kind, bad_value, bad_value, bad_value,
                              ssm_without_target]


# ---------------------------------------------------------------------------- text mutations (broken TOML)

def unterminated_string(rnd, text):
    quotes = [m.start() for m in re.finditer(r'= "', text)]
    at = rnd.choice(quotes) + 3
    end = text.index('"', at)
    return text[:end] + text[end + 1:], "a string loses its closing quote"


def duplicate_key_line(rnd, text):
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines) if " = " in line]
    i = rnd.choice(candidates)
    lines.insert(i + 1, lines[i])
    return "\n".join(lines), f"line {i + 1} repeated (duplicate key)"


def stray_bracket(rnd, text):
    lines = text.split("\n")
    i = rnd.randrange(len(lines))
    lines.insert(i, rnd.choice(["[vault", "[[clusters]", "]", "[]", "[aws.]", "= 5", "key =", "key = [1, 2",
                                "key = {a = 1", '"unclosed = 1', "[[vault]]"]))
    return "\n".join(lines), f"garbage line inserted at {i + 1}"


def cut_mid_string(rnd, text):
    quotes = [m.start() for m in re.finditer(r'= "', text)]
    at = rnd.choice(quotes) + 3 + rnd.randrange(1, 4)
    return text[:at], f"file cut at byte {at} (inside a string)"


def bad_bytes(rnd, text):
    raw = text.encode()
    at = rnd.randrange(len(raw))
    junk = rnd.choice([b"\xff\xfe", b"\x80", b"\xc3\x28", b"\x00", b"\x1b[31m"])
    if junk in (b"\x00", b"\x1b[31m"):     # control characters: valid UTF-8, invalid TOML
        at = raw.index(b'= "') + 3
    return raw[:at] + junk + raw[at:], f"bytes {junk!r} inserted at {at}"


TEXTUAL = [unterminated_string, duplicate_key_line, stray_bracket, cut_mid_string, bad_bytes]


# ---------------------------------------------------------------------------- the generator

def good_text() -> str:
    return dump(GOOD)


def _one(rnd: random.Random) -> BadConfig:
    if rnd.random() < 0.2:
        text, what = rnd.choice(TEXTUAL)(rnd, good_text())
        return BadConfig(text, [what], [""])
    doc = copy.deepcopy(GOOD)
    bad = BadConfig("")
    while not bad.what:
        for _ in range(rnd.choice([1, 1, 1, 2, 3])):
            before = copy.deepcopy(doc)
            try:
                what, path = rnd.choice(STRUCTURED)(rnd, doc)
            except (KeyError, TypeError, IndexError, ValueError, AttributeError):
                doc = before                 # an earlier mutation removed what this one edits
                continue
            bad.what.append(what)
            bad.expect.append(path)
    bad.text = dump(doc)
    return bad


def generate(n: int = 1000, seed: int = 20240901) -> list[BadConfig]:
    """``n`` bad configs, the same ones for the same seed."""
    rnd = random.Random(seed)
    return [_one(rnd) for _ in range(n)]
