"""Targeted edits of ``params.yaml``: set dotted keys, keep everything else byte for byte.

The flow passes its parameters to the DVC stages through ``params.yaml``. A YAML round trip
would re-wrap long lists, drop ``null`` spellings and re-indent, so an existing scalar is
replaced in place instead: the new value (YAML flow syntax, quoted where needed) takes the
old value's characters on its line, comments and the rest of the file are untouched. Only
new keys or non-scalar values fall back to a comment-preserving round trip (ruamel.yaml).
The file is rewritten atomically, and only when a value changes.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from leo.atomic import write_text

SCALARS = (str, int, float, bool, type(None))


def flow_scalar(value: Any) -> str:
    """``value`` as a YAML scalar that reads back the same in block and flow context."""
    text = yaml.safe_dump([value], default_flow_style=True, width=1 << 20).strip()
    return text[1:-1]


def _token_end(line: str, start: int, flow: bool) -> int:
    """End of the scalar token beginning at ``line[start]`` (quoted, or plain up to a comment,
    or in a flow collection up to ``,``/``}``/``]``)."""
    if line[start : start + 1] in ("'", '"'):
        quote, i = line[start], start + 1
        while i < len(line):
            if line[i] == quote:
                if quote == "'" and line[i + 1 : i + 2] == "'":  # '' escapes ' in single quotes
                    i += 2
                    continue
                return i + 1
            i += 2 if (quote == '"' and line[i] == "\\") else 1
        return -1
    end = len(line.rstrip("\r\n"))
    for stop in (" #", "\t#", *((",", "}", "]") if flow else ())):
        pos = line.find(stop, start)
        if pos != -1:
            end = min(end, pos)
    return len(line[:end].rstrip())


def _locate(doc: Any, dotted: str, path: Path) -> tuple[CommentedMap, str]:
    *parents, leaf = dotted.split(".")
    node = doc
    for i, part in enumerate(parents):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{path}: no section '{'.'.join(parents[: i + 1])}' for '{dotted}'")
        node = node[part]
    if not isinstance(node, dict):
        raise KeyError(f"{path}: '{dotted}' is not inside a mapping")
    return node, leaf


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _get(doc: Any, dotted: str) -> Any:
    node = doc
    for part in dotted.split("."):
        node = node[part]
    return node


def write_params(path: str | Path, updates: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set dotted keys of a YAML file; return ``{key: (old, new)}`` of the values that changed.

    Raises:
        KeyError: a key whose parent section does not exist.
    """
    path = Path(path)
    text = path.read_text()
    rt = YAML()
    doc = rt.load(text)  # positions and comments
    plain = yaml.safe_load(text)  # plain Python values, to compare with
    lines = text.splitlines(keepends=True)
    changed: dict[str, tuple[Any, Any]] = {}
    fallback = False
    for dotted, value in updates.items():
        node, leaf = _locate(doc, dotted, path)
        old = _get(plain, dotted) if leaf in node else None
        if leaf in node and _same(old, value):
            continue
        changed[dotted] = (old, value)
        if fallback or leaf not in node or not isinstance(old, SCALARS):
            fallback = True
        elif isinstance(value, SCALARS):
            row, col = node.lc.value(leaf)
            end = _token_end(lines[row], col, bool(node.fa.flow_style()))
            if end > col:
                lines[row] = lines[row][:col] + flow_scalar(value) + lines[row][end:]
            else:
                fallback = True
        else:
            fallback = True
        node[leaf] = value
    if not changed:
        return changed
    if fallback:  # comment-preserving round trip of the updated document
        rt.width = 4096
        rt.indent(mapping=2, sequence=4, offset=2)
        rt.representer.add_representer(
            type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
        )
        buf = StringIO()
        rt.dump(doc, buf)
        new_text = buf.getvalue()
    else:
        new_text = "".join(lines)
    check = yaml.safe_load(new_text)
    for dotted, (_, value) in changed.items():
        if not _same(_get(check, dotted), value):
            raise ValueError(f"{path}: could not set '{dotted}' to {value!r} in place")
    write_text(path, new_text)
    return changed
