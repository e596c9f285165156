"""A pickle loader that cannot execute code: it rebuilds only containers, strings and arrays.

A pickle is a small program: ``GLOBAL``/``STACK_GLOBAL`` (and the ``EXT*`` opcodes) look up
any importable callable and ``REDUCE`` calls it, so ``pickle.load`` on an untrusted file can
run ``os.system``. Every such lookup goes through ``Unpickler.find_class``; ``SafeUnpickler``
answers it from a fixed table and refuses everything else, so no other callable can be
reached. What the table admits (the names numpy 1 / Python 2 pickles use, ``numpy.core``, and
the names numpy 2 pickles use, ``numpy._core``, map to the same objects):

================================================  =======================================
pickle global                                     what it may do
================================================  =======================================
``numpy.{core,_core}.multiarray._reconstruct``    make an empty ``ndarray`` (the array's
                                                  dtype, shape and data come from its
                                                  ``__setstate__``, run by ``BUILD``)
``numpy.ndarray``                                 only as ``_reconstruct``'s first argument
``numpy.dtype``                                   ``dtype(str, align, copy)``
``numpy.{core,_core}.multiarray.scalar``          a numpy scalar of an admitted dtype
``numpy.{core,_core}.numeric._frombuffer``        an array over an in-band buffer (protocol 5)
``_codecs.encode``                                only ``encode(str, "latin1")``: how Python 3
                                                  writes ``bytes`` at protocols 0-2
``__builtin__.bytes`` / ``builtins.bytes``        only ``bytes()``: an empty ``bytes``
================================================  =======================================

dicts, lists, tuples, sets, str, bytes, bytearray, ints, floats, bools and None need no global.
The admitted callables are fresh wrappers for each load (or immutable builtins), so a ``BUILD``
opcode aimed at one of them cannot change state that outlives the load.

After loading, every numpy array and scalar in the result must have a numeric dtype (bool,
int, uint, float, complex) or a fixed-width ``bytes``/``str`` dtype. Object-dtype arrays are
refused unless every element is a ``str`` or ``bytes`` (deviation from a blanket refusal,
on purpose): their elements were built by this same restricted unpickler, so they can only be
the types above, and the published LEO embeddings almost certainly store their ``keys`` that
way (TensorFlow returns string tensors as object arrays; loaders of those files call
``key.split("-")``, which fails on a fixed-width bytes array). Any other element (a number, a
nested list or array) is refused.

Python 2 pickles are read with ``encoding="latin1"``: a Python 2 ``str`` becomes a Python 3
``str`` whose code points are its bytes, which is also how numpy rebuilds array data stored
as a Python 2 ``str``.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from leo.utils.errors import LeoInputError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

__all__ = ["SafeUnpickler", "safe_load"]

_ALLOWED_KINDS = frozenset("biufcSU")
_HINT = "only dicts, lists, strings and numpy arrays are allowed"


class _Token:
    """An inert stand-in for ``numpy.ndarray``: not callable, no attributes can be set."""

    __slots__ = ()


_NDARRAY = _Token()


def _dtype_ok(dtype: np.dtype) -> bool:
    return dtype.kind in _ALLOWED_KINDS and dtype.fields is None and dtype.subdtype is None


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that admits only the globals listed in the module docstring.

    Args:
        file: a binary file object positioned at the pickle.
        name: how errors name the source (usually the file path).
    """

    def __init__(self, file: BinaryIO, *, name: str) -> None:
        super().__init__(file, encoding="latin1")
        self._name = name
        self._table: dict[tuple[str, str], Callable[[], Any]] = {}
        for core in ("numpy.core", "numpy._core"):
            self._table[(f"{core}.multiarray", "_reconstruct")] = self._reconstruct
            self._table[(f"{core}.multiarray", "scalar")] = self._scalar
            self._table[(f"{core}.numeric", "_frombuffer")] = self._frombuffer
        self._table[("numpy", "ndarray")] = lambda: _NDARRAY
        self._table[("numpy", "dtype")] = self._dtype
        self._table[("_codecs", "encode")] = self._encode
        self._table[("__builtin__", "bytes")] = self._bytes
        self._table[("builtins", "bytes")] = self._bytes

    # -- find_class: the only door to callables -------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        """Return a fresh wrapper for an admitted global; raise ``LeoInputError`` otherwise."""
        make = self._table.get((module, name))
        if make is None:
            raise LeoInputError(f"{self._name}: refused to load global '{module}.{name}' ({_HINT})")
        return make()

    def persistent_load(self, pid: Any) -> Any:
        raise LeoInputError(f"{self._name}: refused a persistent id ({_HINT})")

    def _refuse_call(self, what: str, detail: str) -> LeoInputError:
        return LeoInputError(f"{self._name}: refused to call '{what}' with {detail} ({_HINT})")

    # -- wrappers: each call builds a new function, so BUILD cannot alter a shared one --------

    def _reconstruct(self) -> Callable[..., np.ndarray]:
        def reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
            if subtype is not _NDARRAY:
                raise self._refuse_call("_reconstruct", f"subtype {type(subtype).__name__}")
            if typecode not in (b"b", "b"):
                raise self._refuse_call("_reconstruct", f"typecode {typecode!r}")
            return _multiarray._reconstruct(np.ndarray, shape, b"b")

        return reconstruct

    def _dtype(self) -> Callable[..., np.dtype]:
        def dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
            if not isinstance(obj, str | bytes):
                raise self._refuse_call("numpy.dtype", f"a {type(obj).__name__} description")
            if isinstance(obj, bytes):
                obj = obj.decode("latin1")
            return np.dtype(obj, align=bool(align), copy=bool(copy))

        return dtype

    def _scalar(self) -> Callable[..., Any]:
        def scalar(dtype: Any, obj: Any = None) -> Any:
            if not isinstance(dtype, np.dtype) or not _dtype_ok(dtype):
                raise self._refuse_call("numpy scalar", f"dtype {dtype!r}")
            if not isinstance(obj, bytes | str):
                raise self._refuse_call("numpy scalar", f"{type(obj).__name__} data")
            if isinstance(obj, str):
                obj = obj.encode("latin1")
            return _multiarray.scalar(dtype, obj)

        return scalar

    def _frombuffer(self) -> Callable[..., np.ndarray]:
        def frombuffer(
            buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None
        ) -> np.ndarray:
            if not isinstance(buf, bytes | bytearray):
                raise self._refuse_call("_frombuffer", f"a {type(buf).__name__} buffer")
            if not isinstance(dtype, np.dtype) or not _dtype_ok(dtype):
                raise self._refuse_call("_frombuffer", f"dtype {dtype!r}")
            return _numeric._frombuffer(buf, dtype, shape, order, axis_order)

        return frombuffer

    def _encode(self) -> Callable[..., bytes]:
        def encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
            if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
                raise self._refuse_call("_codecs.encode", f"encoding {encoding!r}")
            return obj.encode("latin1")

        return encode

    def _bytes(self) -> Callable[..., bytes]:
        def empty_bytes(*args: Any) -> bytes:
            if args:
                raise self._refuse_call("bytes", "arguments")
            return b""

        return empty_bytes


def _check_result(obj: Any, name: str) -> None:
    """Refuse arrays/scalars of dtypes outside the allowed set anywhere inside ``obj``."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif isinstance(item, np.ndarray | np.generic):
            dtype = item.dtype
            if dtype.kind == "O" and isinstance(item, np.ndarray):
                for element in item.flat:
                    if not isinstance(element, str | bytes):
                        raise LeoInputError(
                            f"{name}: refused an object array holding a "
                            f"{type(element).__name__} (object arrays may hold only str or "
                            f"bytes; {_HINT})"
                        )
            elif not _dtype_ok(dtype):
                raise LeoInputError(f"{name}: refused an array of dtype {dtype} ({_HINT})")


def safe_load(path_or_file: str | os.PathLike | BinaryIO, *, name: str | None = None) -> object:
    """Load a pickle that may contain only dicts, lists, tuples, strings, numbers and arrays.

    Args:
        path_or_file: a path, or a binary file object positioned at the pickle.
        name: how errors name the source; default the path (or the file object's ``name``).

    Returns:
        The unpickled object; Python 2 strings come back as ``str`` (latin-1 decoded).

    Raises:
        LeoInputError: missing file, a refused global or dtype, or a malformed pickle; the
            one-line message starts with the file name.
    """
    if isinstance(path_or_file, str | os.PathLike):
        path = Path(path_or_file)
        label = name or str(path)
        if not path.is_file():
            raise LeoInputError(f"{label}: no such file")
        with open(path, "rb") as fh:
            return _load(fh, label)
    label = name or str(getattr(path_or_file, "name", "<pickle>"))
    return _load(path_or_file, label)


def _load(fh: BinaryIO, label: str) -> object:
    if isinstance(fh, io.TextIOBase):
        raise LeoInputError(f"{label}: pickles must be opened in binary mode")
    try:
        result = SafeUnpickler(fh, name=label).load()
    except LeoInputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # any failure inside load means a bad pickle
        raise LeoInputError(f"{label}: not a valid pickle ({type(exc).__name__}: {exc})") from exc
    _check_result(result, label)
    return result
