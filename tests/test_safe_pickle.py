"""Tests for leo.data.safe_pickle: real Python 2 pickles load; code-running pickles are refused.

The Python 2 fixtures below are the exact bytes that CPython 2.7.18 with numpy 1.16.6 wrote
(``pip install --target`` of numpy 1.16.6 into a pyenv 2.7.18 interpreter) for::

    d = {'embeddings': np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5,
         'keys': KEYS,
         'labels': np.array([0, 1])}
    cPickle.dumps(d, protocol=2)

with ``KEYS = np.array(['p-n01-n01_1.JPEG', 'p-n02-n02_7.JPEG'], dtype=object)`` (an object
array of Python 2 ``str``, how TensorFlow hands back string tensors) for ``PY2_OBJECT_KEYS``
and the same list as a fixed-width ``S16`` array for ``PY2_BYTES_KEYS``. They use the
``numpy.core.multiarray`` global, Python 2 ``str`` opcodes (SHORT_BINSTRING) for text and for
the array data, and ints for ``dtype``'s align/copy flags.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import pickletools
import subprocess

import numpy as np
import pytest

from leo.data.safe_pickle import safe_load
from leo.utils.errors import LeoInputError

PY2_OBJECT_KEYS = bytes.fromhex(
    "80027d71012855046b6579737102636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e73"
    "74727563740a7103636e756d70790a6e6461727261790a71044b008555016287527105284b014b0285636e75"
    "6d70790a64747970650a710655024f384b004b0187527107284b0355017c4e4e4e4affffffff4affffffff4b"
    "3f7462895d7108285510702d6e30312d6e30315f312e4a50454771095510702d6e30322d6e30325f372e4a50"
    "4547710a65746255066c6162656c73710b680368044b00855501628752710c284b014b02856806550269384b"
    "004b018752710d284b0355013c4e4e4e4affffffff4affffffff4b0074628955100000000000000000010000"
    "00000000007462550a656d62656464696e6773710e680368044b00855501628752710f284b014b024b038668"
    "06550266344b004b0187527110284b0355013c4e4e4e4affffffff4affffffff4b0074628955180000003f00"
    "00c03f0000204000006040000090400000b0407462752e"
)
PY2_BYTES_KEYS = bytes.fromhex(
    "80027d71012855046b6579737102636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e73"
    "74727563740a7103636e756d70790a6e6461727261790a71044b008555016287527105284b014b0285636e75"
    "6d70790a64747970650a710655035331364b004b0187527107284b0355017c4e4e4e4b104b014b0074628955"
    "20702d6e30312d6e30315f312e4a504547702d6e30322d6e30325f372e4a504547746255066c6162656c7371"
    "08680368044b008555016287527109284b014b02856806550269384b004b018752710a284b0355013c4e4e4e"
    "4affffffff4affffffff4b007462895510000000000000000001000000000000007462550a656d6265646469"
    "6e6773710b680368044b00855501628752710c284b014b024b03866806550266344b004b018752710d284b03"
    "55013c4e4e4e4affffffff4affffffff4b0074628955180000003f0000c03f00002040000060400000904000"
    "00b0407462752e"
)
KEYS = ["p-n01-n01_1.JPEG", "p-n02-n02_7.JPEG"]
EMBEDDINGS = [[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]]
REFUSED = "only dicts, lists, strings and numpy arrays are allowed"


def _globals_in(data: bytes) -> list[str]:
    return [str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]


# -- Python 2 pickles ------------------------------------------------------------------------


def test_py2_fixtures_are_python2_protocol2_with_numpy1_names():
    for data in (PY2_OBJECT_KEYS, PY2_BYTES_KEYS):
        ops = [op.name for op, _, _ in pickletools.genops(data)]
        assert ops[0] == "PROTO" and data[1] == 2
        assert "SHORT_BINSTRING" in ops and "BINUNICODE" not in ops
        assert "numpy.core.multiarray _reconstruct" in _globals_in(data)


def test_loads_python2_pickle_with_object_array_of_str_keys():
    d = safe_load(io.BytesIO(PY2_OBJECT_KEYS))
    assert sorted(d) == ["embeddings", "keys", "labels"]
    assert d["embeddings"].dtype == np.float32 and d["embeddings"].tolist() == EMBEDDINGS
    assert d["keys"].dtype == object and list(d["keys"]) == KEYS
    assert all(type(k) is str for k in d["keys"])
    assert d["labels"].dtype == np.int64 and d["labels"].tolist() == [0, 1]


def test_loads_python2_pickle_with_fixed_width_bytes_keys():
    d = safe_load(io.BytesIO(PY2_BYTES_KEYS))
    assert d["keys"].dtype == np.dtype("S16")
    assert [k.decode() for k in d["keys"]] == KEYS
    # Bytes 0x80-0xff inside the array data survive the latin-1 string decoding.
    assert d["embeddings"].tolist() == EMBEDDINGS


def test_loads_from_path_and_names_the_file_in_errors(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(PY2_OBJECT_KEYS)
    assert list(safe_load(good)["keys"]) == KEYS
    with pytest.raises(LeoInputError, match=r"missing\.pkl: no such file"):
        safe_load(tmp_path / "missing.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(LeoInputError, match=r"bad\.pkl: not a valid pickle"):
        safe_load(bad)
    with pytest.raises(LeoInputError, match=r"^custom-name: not a valid pickle"):
        safe_load(io.BytesIO(PY2_OBJECT_KEYS[:-10]), name="custom-name")


# -- Python 3 pickles ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_loads_python3_pickles_of_allowed_types(protocol):
    rng = np.random.default_rng(protocol)
    obj = {
        "f32": rng.standard_normal((4, 3)).astype(np.float32),
        "f64_fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "i64_strided": np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],
        "u8": np.arange(5, dtype=np.uint8),
        "bool": np.array([True, False]),
        "c64": np.array([1 + 2j], dtype=np.complex64),
        "U": np.array(["ab", "ü"]),
        "S": np.array([b"ab", b"\xff"]),
        "obj_str": np.array(["a-b", b"c"], dtype=object),
        "scalar": np.float32(2.5),
        "bytes": b"\x00\xffxy",
        "empty_bytes": b"",
        b"bytes_key": "text",
        "nested": [1, 2.5, None, True, ("t", [b"x"]), {"k": np.zeros(2)}],
    }
    out = safe_load(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
    assert out.keys() == obj.keys()
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            assert out[key].dtype == value.dtype and np.array_equal(out[key], value), key
    assert out["f64_fortran"].flags.f_contiguous
    assert out["scalar"] == np.float32(2.5) and out["scalar"].dtype == np.float32
    assert out["bytes"] == b"\x00\xffxy" and out["empty_bytes"] == b""
    assert out[b"bytes_key"] == "text"
    assert out["nested"][:4] == [1, 2.5, None, True] and out["nested"][4] == ("t", [b"x"])
    assert np.array_equal(out["nested"][5]["k"], np.zeros(2))


# -- pickles that try to run code ------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``: what an attacker's ``__reduce__`` looks like."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _refused(data: bytes, global_name: str) -> None:
    with pytest.raises(LeoInputError) as info:
        safe_load(io.BytesIO(data), name="evil.pkl")
    message = str(info.value)
    assert message.startswith("evil.pkl: refused")
    assert f"'{global_name}'" in message and REFUSED in message
    assert "\n" not in message


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_refuses_os_system_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"embeddings": _Reduce(os.system, f"touch {marker}")}, protocol=protocol)
    _refused(data, f"{os.system.__module__}.system")
    hand_written = f"cos\nsystem\n(V touch {marker}\ntR.".encode()  # protocol 0, by hand
    _refused(hand_written, "os.system")
    assert not marker.exists()
    # Control: the payload is live; a plain pickle.loads runs it.
    pickle.loads(data)
    assert marker.exists()


def test_refuses_builtins_eval_under_python2_and_python3_names(tmp_path):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('x')"
    _refused(f"cbuiltins\neval\n(V{code}\ntR.".encode(), "builtins.eval")
    _refused(f"c__builtin__\neval\n(S{code!r}\ntR.".encode(), "__builtin__.eval")
    _refused(pickle.dumps(_Reduce(eval, code), protocol=4), "builtins.eval")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("protocol", "name"), [(2, "commands.Popen"), (5, "subprocess.Popen")]
)  # protocol 2 writes the Python 2 module name
def test_refuses_subprocess_popen(tmp_path, protocol, name):
    marker = tmp_path / "pwned"
    data = pickle.dumps([_Reduce(subprocess.Popen, ["touch", str(marker)])], protocol=protocol)
    _refused(data, name)
    assert not marker.exists()


def test_refuses_indirect_routes(tmp_path):
    import functools

    marker = tmp_path / "pwned"
    partial = functools.partial(os.system, f"touch {marker}")
    _refused(pickle.dumps(_Reduce(partial), protocol=2), "functools.partial")
    # Protocol 0/1 pickles of plain objects go through copyreg.
    _refused(pickle.dumps(_Reduce, protocol=0), f"{_Reduce.__module__}._Reduce")
    _refused(b"ccopy_reg\n_reconstructor\n(c__builtin__\nobject\ntR.", "copy_reg._reconstructor")
    # An attacker's object hidden inside a numpy object array is still a global lookup.
    hidden = np.array([_Reduce(os.system, f"touch {marker}")], dtype=object)
    _refused(pickle.dumps({"keys": hidden}, protocol=2), f"{os.system.__module__}.system")
    assert not marker.exists()


def test_refuses_extension_registry_lookups(tmp_path):
    marker = tmp_path / "pwned"
    module = os.system.__module__  # posix
    copyreg.add_extension(module, "system", 0xF1)
    try:
        data = pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2)
        assert b"\x82\xf1" in data and b"system" not in data  # EXT1 0xf1, not a GLOBAL
        _refused(data, f"{module}.system")
    finally:
        copyreg.remove_extension(module, "system", 0xF1)
    assert not marker.exists()


def test_refuses_persistent_ids():
    with pytest.raises(LeoInputError, match="refused a persistent id"):
        safe_load(io.BytesIO(b"\x80\x02X\x03\x00\x00\x00abcQ."), name="p.pkl")


def test_admitted_globals_refuse_unexpected_arguments():
    # _codecs.encode with an encoding other than latin-1.
    data = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(LeoInputError, match=r"refused to call '_codecs.encode'"):
        safe_load(io.BytesIO(data), name="x.pkl")
    # bytes(n) would allocate; only bytes() is admitted.
    with pytest.raises(LeoInputError, match=r"refused to call 'bytes'"):
        safe_load(io.BytesIO(b"\x80\x02c__builtin__\nbytes\nK\x05\x85R."), name="x.pkl")
    # _reconstruct of something other than ndarray.
    bad = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R."
    with pytest.raises(LeoInputError, match=r"refused to call '_reconstruct'"):
        safe_load(io.BytesIO(bad), name="x.pkl")
    # numpy.ndarray is only a token for _reconstruct: calling it or BUILD on it fails, and
    # no attribute lands on the real class.
    for data in (
        b"\x80\x02cnumpy\nndarray\nK\x03\x85R.",  # ndarray((3,))
        b"\x80\x02cnumpy\nndarray\nN}U\x04evilK\x01s\x86b.",  # BUILD: setattr(ndarray, "evil", 1)
    ):
        with pytest.raises(LeoInputError, match="not a valid pickle"):
            safe_load(io.BytesIO(data), name="x.pkl")
    assert not hasattr(np.ndarray, "evil")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array([1, "a"], dtype=object), "object array holding a int"),
        (np.array([None], dtype=object), "object array holding a NoneType"),
        (np.array([[1.0]], dtype=object), "object array holding a float"),
        (np.zeros(2, dtype=[("a", "f4")]), "dtype"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "dtype datetime64"),
    ],
)
def test_refuses_arrays_of_other_dtypes(array, message):
    for protocol in (2, 5):
        with pytest.raises(LeoInputError, match=message):
            safe_load(io.BytesIO(pickle.dumps({"a": array}, protocol=protocol)), name="x.pkl")
