"""Edits of ``params.yaml`` by dotted key, through ruamel.yaml's round trip.

The flow hands its parameters to the DVC stages through ``params.yaml``. ruamel.yaml's
round-trip mode keeps the comments, the key order, flow-style lists and the spelling of
every scalar it does not touch, so an edit changes the lines of the keys it sets and
nothing else (tested on the repository's own ``params.yaml``). :func:`edited` computes the
new text without writing anything, so the caller can validate it first; :func:`write_text`
(atomic) writes it.
"""

from __future__ import annotations

from io import StringIO
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap


def _yaml() -> YAML:
    rt = YAML()  # round trip
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(  # null, not an empty value
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return rt


def _parent(doc: Any, dotted: str, where: str) -> tuple[CommentedMap, str]:
    *parents, leaf = dotted.split(".")
    node = doc
    for i, part in enumerate(parents):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{where}: no section '{'.'.join(parents[: i + 1])}' for '{dotted}'")
        node = node[part]
    if not isinstance(node, dict):
        raise KeyError(f"{where}: '{dotted}' is not inside a mapping")
    return node, leaf


def _plain(value: Any) -> Any:
    """ruamel's round-trip types as plain Python values (for comparing)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def edited(text: str, updates: dict[str, Any], where: str = "params.yaml"):
    """Apply ``{"dotted.key": value}`` to YAML ``text``.

    Returns:
        ``(new_text, changed, document)``: the edited text (``text`` itself when nothing
        changes), ``{key: (old, new)}`` of the values that changed, and the edited document as
        plain Python values.

    Raises:
        KeyError: a key whose parent section does not exist.
    """
    rt = _yaml()
    doc = rt.load(text)
    changed: dict[str, tuple[Any, Any]] = {}
    for dotted, value in updates.items():
        node, leaf = _parent(doc, dotted, where)
        old = _plain(node[leaf]) if leaf in node else None
        if leaf in node and _same(old, value):
            continue
        changed[dotted] = (old, value)
        node[leaf] = value
    if not changed:
        return text, changed, _plain(doc)
    buf = StringIO()
    rt.dump(doc, buf)
    return buf.getvalue(), changed, _plain(doc)
