"""Validated configs: pydantic dataclasses and one-line messages naming the bad key.

Every config of the project (``LEOConfig``, ``MAMLConfig``, ``PretrainConfig``, the
``params.yaml`` sections) is validated by pydantic: types are strict (a string is not a
number, a bool is not an int), ranges come from ``Field`` constraints, and unknown keys are
refused. :func:`one_line` turns pydantic's report into the one line a user reads::

    params.yaml: metatrain.common.validate_every: must be greater than 0 (got -100)
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, ValidationError

from leo.utils.errors import LeoInputError

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # torch device names we accept

STRICT = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)

PosInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Weight = Annotated[float, Field(ge=0.0)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]
Positive = Annotated[float, Field(gt=0.0)]


def _device(name: str) -> str:
    if not DEVICE_PATTERN.match(name):
        raise ValueError("must be auto, cpu, cuda or cuda:<index>")
    return name


def _sha256(digest: str) -> str:
    if not SHA256_PATTERN.match(digest):
        raise ValueError("must be 64 lower-case hex digits")
    return digest


Device = Annotated[str, AfterValidator(_device)]
Sha256 = Annotated[str, AfterValidator(_sha256)]


def _message(err: dict[str, Any]) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "unknown key"
    if kind == "missing":
        return "missing key"
    msg = msg[0].lower() + msg[1:] if msg else msg
    msg = msg.removeprefix("input should be ").removeprefix("value error, ")
    if kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "enum"):
        msg = f"must be {msg}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        msg = f"must be {msg}"
    if "input" not in err or kind == "missing" or "(got " in msg or isinstance(err["input"], dict):
        return msg
    return f"{msg} (got {err['input']!r})"


def error_key(err: dict[str, Any], prefix: str = "") -> str:
    """The dotted key an error of ``ValidationError.errors()`` is about, list positions as
    ``[i]`` (union members that pydantic names in the location, such as ``int`` or
    ``literal['auto']``, left out)."""
    key = prefix
    for part in err.get("loc", ()):
        if isinstance(part, int):
            key += f"[{part}]"
        elif not _union_tag(part):
            key += f".{part}" if key else part
    return key


_UNION_TAGS = {"int", "float", "bool", "str", "none", "list", "dict", "tuple"}


def _union_tag(part: str) -> bool:
    """Whether a location part names a union member or a validator, not a key."""
    return part in _UNION_TAGS or "[" in part or part.startswith(("function", "constrained-"))


def one_line(error: ValidationError, where: str, prefix: str = "") -> LeoInputError:
    """The first error of ``error`` as a :class:`LeoInputError`: ``where: key: what``.

    A value that matches no member of a union (``int | [H, W]``) fails once per member; the
    members' complaints are joined with "or" in the one line.
    """
    errors = error.errors(include_url=False)
    first = errors[0]
    key = error_key(first, prefix)
    same = [e for e in errors if error_key(e, prefix) == key] if _in_union(first) else [first]
    whats = list(
        dict.fromkeys(_message({**e, "input": None}).removesuffix(" (got None)") for e in same)
    )
    what = " or ".join(whats)
    quiet = ("missing", "extra_forbidden", "unexpected_keyword_argument")
    if "input" in first and first.get("type") not in quiet and not isinstance(first["input"], dict):
        what = what if "(got " in what else f"{what} (got {first['input']!r})"
    return LeoInputError(f"{where}: {key}: {what}" if key else f"{where}: {what}")


def _in_union(err: dict[str, Any]) -> bool:
    return any(isinstance(p, str) and _union_tag(p) for p in err.get("loc", ()))


def build(cls: type, values: dict[str, Any], where: str, prefix: str = "") -> Any:
    """``cls(**values)`` for a validated dataclass; a pydantic error becomes one line."""
    try:
        return cls(**values)
    except ValidationError as err:
        raise one_line(err, where, prefix) from None
