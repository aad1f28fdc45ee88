"""Chart values: the defaults, Helm-style overrides, and the check of every key against a schema.

Semantics follow Helm's: value files merge in order, maps merge deeply, lists are replaced
whole, and `--set a.b[0].c=x` takes dotted paths with list indices (`\\.` escapes a dot in a
key, `a={x,y}` is a list, commas separate several assignments). Unlike Helm, every key is
checked as it is merged: an unknown one is an error that names it and suggests the closest
known key, and a value whose type differs from the default's is an error.

The schema is the default `values.yaml` itself (a map with keys is closed, an empty map `{}`
is open to any keys, list contents are free), except that the `training` sections take their
keys from the trainer's own config dataclasses, so every trainer setting is accepted there,
including ones added to the trainer later. The merge is done here rather than by OmegaConf
because each key must be checked against that schema, with a suggestion, as it is merged.

This module owns the values only; `render` turns them into Kubernetes objects.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import yaml

from jcl_k8s.errors import UserError

JOBS = ("pretrain", "lincls")

# Trainer keys the chart sets itself; they must not be set under `<job>.training`.
RESERVED_TRAINING_KEYS = {
    "metrics": "the metrics settings come from the chart: set metrics.port instead",
}

Path = list[str | int]


class ValuesError(UserError):
    """A values file or `--set` that cannot be used, naming the key to fix."""


def defaults_text() -> str:
    """The default values.yaml shipped inside the package, comments included."""
    return resources.files("jcl_k8s.k8s").joinpath("values.yaml").read_text(encoding="utf-8")


def default_values() -> dict[str, Any]:
    """The default values as a fresh mutable tree."""
    return yaml.safe_load(defaults_text())


def schema() -> dict[str, Any]:
    """The tree every values key is checked against (see the module docstring)."""
    from omegaconf import OmegaConf

    from jcl_k8s.config import SCHEMAS

    tree = default_values()
    for job in JOBS:
        trainer = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[job]), resolve=False)
        for key in RESERVED_TRAINING_KEYS:
            trainer.pop(key, None)
        tree[job]["training"] = _trainer_leaves(trainer)
    return tree


def _trainer_leaves(tree: dict[str, Any]) -> dict[str, Any]:
    # OmegaConf writes a required field as '???': it is a string setting.
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves[key] = _trainer_leaves(value)
        else:
            leaves[key] = "" if value == "???" else value
    return leaves


def load_values(
    files: Sequence[str] = (),
    sets: Sequence[str] = (),
    set_strings: Sequence[str] = (),
) -> dict[str, Any]:
    """Defaults, then each values file in order, then `--set`, then `--set-string`, checked."""
    tree = schema()
    values = default_values()
    for path in files:
        merge(values, _read_values_file(path), tree, source=path)
    for expression in sets:
        for key_path, raw in parse_set(expression):
            assign(values, key_path, raw, tree, force_string=False)
    for expression in set_strings:
        for key_path, raw in parse_set(expression):
            assign(values, key_path, raw, tree, force_string=True)
    return values


def _read_values_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ValuesError(f"values file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ValuesError(f"values file {path} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValuesError(f"values file {path} must hold a mapping, not {type(loaded).__name__}")
    return loaded


def merge(
    values: dict[str, Any], override: dict[str, Any], tree: Any, source: str = "", at: Path = ()
) -> dict[str, Any]:
    """Merge `override` into `values` in place: maps deeply, lists and scalars replaced."""
    for key, new in override.items():
        path = [*at, str(key)]
        child_schema = _child(tree, str(key), path, source)
        old = values.get(key)
        _check_type(new, child_schema, path, source)
        if isinstance(new, dict):
            base = old if isinstance(old, dict) else {}
            values[key] = merge(base, new, child_schema, source, path)
        else:
            values[key] = copy.deepcopy(new)
    return values


def assign(values: Any, path: Path, raw: str | list[str], tree: Any, force_string: bool) -> None:
    """Set one `--set` assignment, typing the raw text by the schema's default at that key."""
    node, node_schema = values, tree
    for depth, token in enumerate(path):
        last = depth == len(path) - 1
        here = path[: depth + 1]
        if isinstance(token, int):
            if not isinstance(node, list):
                raise ValuesError(f"{format_path(here)}: {format_path(path[:depth])} is not a list")
            if token > len(node):
                raise ValuesError(
                    f"{format_path(here)}: index {token} is past the end of a list of {len(node)}"
                )
            child_schema = None
            if last:
                value = _typed(raw, None, here, force_string)
                if token == len(node):
                    node.append(value)
                else:
                    node[token] = value
                return
            if token == len(node):
                node.append([] if isinstance(path[depth + 1], int) else {})
            elif not isinstance(node[token], dict | list):
                node[token] = [] if isinstance(path[depth + 1], int) else {}
            node, node_schema = node[token], child_schema
            continue
        if not isinstance(node, dict):
            raise ValuesError(f"{format_path(here)}: {format_path(path[:depth])} is not a map")
        child_schema = _child(node_schema, token, here, "--set")
        if last:
            value = _typed(raw, child_schema, here, force_string)
            _check_type(value, child_schema, here, "--set")
            node[token] = value
            return
        wants_list = isinstance(path[depth + 1], int)
        if not isinstance(node.get(token), list if wants_list else dict):
            _check_type([] if wants_list else {}, child_schema, here, "--set")
            node[token] = [] if wants_list else {}
        node, node_schema = node[token], child_schema


def _child(tree: Any, key: str, path: Path, source: str) -> Any:
    """The schema below `key`, or None where anything goes; unknown keys raise."""
    if not isinstance(tree, dict) or not tree:
        return None
    if key in tree:
        return tree[key]
    where = f"{source}: " if source else ""
    parent = format_path(path[:-1])
    hint = RESERVED_TRAINING_KEYS.get(key) if parent.endswith(".training") else None
    if hint:
        raise ValuesError(f"{where}{format_path(path)} cannot be set: {hint}")
    suggestion = _suggest(key, tree, path)
    inside = f" under {parent}" if parent else ""
    raise ValuesError(f"{where}unknown key {format_path(path)}{inside}{suggestion}")


def _suggest(key: str, siblings: dict[str, Any], path: Path) -> str:
    close = difflib.get_close_matches(key, [str(k) for k in siblings], n=1, cutoff=0.6)
    if close:
        return f"; did you mean {format_path([*path[:-1], close[0]])}?"
    # A key given at the wrong level: look for the same (or a similar) name anywhere.
    everywhere = {format_path(p): p[-1] for p in _paths(schema())}
    by_name = [full for full, name in everywhere.items() if name == key]
    if by_name:
        return f"; did you mean {by_name[0]}?"
    close = difflib.get_close_matches(key, list(set(everywhere.values())), n=1, cutoff=0.75)
    if close:
        full = next(full for full, name in everywhere.items() if name == close[0])
        return f"; did you mean {full}?"
    return f"; known keys here: {', '.join(sorted(str(k) for k in siblings))}"


def _paths(tree: dict[str, Any], at: Path = ()) -> Iterable[Path]:
    for key, value in tree.items():
        yield [*at, key]
        if isinstance(value, dict) and value:
            yield from _paths(value, [*at, key])


def _check_type(value: Any, default: Any, path: Path, source: str) -> None:
    if default is None or value is None:
        # None in the schema: anything goes; None as a value: "unset", checked by render.
        return
    expected = _kind(default)
    actual = _kind(value)
    if expected == actual or (expected == "float" and actual == "integer"):
        return
    where = f"{source}: " if source else ""
    hint = " (quote it, or use --set-string)" if expected == "string" else ""
    raise ValuesError(
        f"{where}{format_path(path)} must be {_article(expected)} {expected}, "
        f"got {actual} {value!r}{hint}"
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+)")


def _typed(raw: str | list[str], default: Any, path: Path, force_string: bool) -> Any:
    """Type `--set` text: by the default's type where the schema has one, else like Helm."""
    if isinstance(raw, list):
        return [_typed(item, None, path, force_string) for item in raw]
    if force_string:
        return raw
    if raw == "null":
        return None
    if isinstance(default, bool) or default is None or isinstance(default, dict | list):
        return infer(raw)
    if isinstance(default, str):
        return raw
    if isinstance(default, int) and _INT.fullmatch(raw):
        return int(raw)
    if isinstance(default, float) and (_INT.fullmatch(raw) or _FLOAT.fullmatch(raw)):
        return float(raw)
    return infer(raw)  # wrong type: _check_type names the key and the expected type


def infer(raw: str) -> Any:
    """Helm's type inference for `--set` text: booleans, null, integers; here floats too."""
    if raw in ("true", "false"):
        return raw == "true"
    if raw == "null":
        return None
    if _INT.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(raw):
        return float(raw)
    return raw


def parse_set(expression: str) -> list[tuple[Path, str | list[str]]]:
    """Split `a.b=1,c[0]=x,d={p,q}` into (path, raw text or list of texts) assignments."""
    assignments = []
    for item in _split(expression, ","):
        key, sep, raw = _partition_unescaped(item, "=")
        if not sep or not key:
            raise ValuesError(f"--set {item!r} is not of the form key=value")
        value: str | list[str]
        if raw.startswith("{") and raw.endswith("}"):
            inner = raw[1:-1]
            value = [_unescape(part) for part in _split(inner, ",")] if inner else []
        else:
            value = _unescape(raw)
        assignments.append((parse_path(key), value))
    return assignments


def parse_path(key: str) -> Path:
    """`a.b\\.c[0].d` -> ['a', 'b.c', 0, 'd']."""
    path: Path = []
    current = ""
    i = 0
    while i < len(key):
        char = key[i]
        if char == "\\" and i + 1 < len(key):
            current += key[i + 1]
            i += 2
            continue
        if char == ".":
            if current:
                path.append(current)
            elif not path or not isinstance(path[-1], int):
                raise ValuesError(f"--set key {key!r} has an empty part")
            current = ""
        elif char == "[":
            end = key.find("]", i)
            index = key[i + 1 : end] if end > 0 else ""
            if not index.isdigit():
                raise ValuesError(f"--set key {key!r}: list index must be a number in [...]")
            if current:
                path.append(current)
                current = ""
            if not path:
                raise ValuesError(f"--set key {key!r} starts with a list index")
            path.append(int(index))
            i = end + 1
            continue
        else:
            current += char
        i += 1
    if current:
        path.append(current)
    if not path:
        raise ValuesError(f"--set key {key!r} is empty")
    return path


def _split(text: str, separator: str) -> list[str]:
    """Split at unescaped separators outside {...}."""
    parts, current, depth, i = [], "", 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            current += text[i : i + 2]
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
        i += 1
    parts.append(current)
    return parts


def _partition_unescaped(text: str, separator: str) -> tuple[str, str, str]:
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == separator:
            return text[:i], separator, text[i + 1 :]
        i += 1
    return text, "", ""


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def format_path(path: Sequence[str | int]) -> str:
    """['a', 'b.c', 0] -> 'a.b\\.c[0]' (how `--set` spells it)."""
    out = ""
    for token in path:
        if isinstance(token, int):
            out += f"[{token}]"
        else:
            escaped = str(token).replace(".", "\\.")
            out += f".{escaped}" if out else escaped
    return out
