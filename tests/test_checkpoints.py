"""Deterministic torch checkpoints: the same object gives the same bytes, whatever the path."""

import pytest
import torch

from leo.utils.atomic import write_torch


def _obj(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "params": {"w": torch.randn(4, 3, generator=gen), "b": torch.zeros(3)},
        "config": {"num_shots": 1, "name": "x"},
        "step": 7,
    }


def test_the_same_object_saved_twice_gives_byte_identical_files(tmp_path):
    write_torch(tmp_path / "a.pt", _obj())
    write_torch(tmp_path / "deeper/other-name.pt", _obj())
    first = (tmp_path / "a.pt").read_bytes()
    assert first == (tmp_path / "deeper/other-name.pt").read_bytes()
    write_torch(tmp_path / "a.pt", _obj())  # overwritten in place: still the same bytes
    assert (tmp_path / "a.pt").read_bytes() == first
    assert (tmp_path / "a.pt").read_bytes() != write_bytes_of(tmp_path, _obj(seed=1))
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["params"]["w"], _obj()["params"]["w"]) and loaded["step"] == 7
    # what write_torch avoids: torch.save to a file path names the archive after the file
    torch.save(_obj(), tmp_path / "p.pt")
    torch.save(_obj(), tmp_path / "q.pt")
    assert (tmp_path / "p.pt").read_bytes() != (tmp_path / "q.pt").read_bytes()


def write_bytes_of(tmp_path, obj) -> bytes:
    write_torch(tmp_path / "other.pt", obj)
    return (tmp_path / "other.pt").read_bytes()


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
    write_torch(tmp_path / "a.pt", _obj())
    before = (tmp_path / "a.pt").read_bytes()
    with pytest.raises(Exception, match="pickle"):
        write_torch(tmp_path / "a.pt", {"f": lambda: 0})
    assert (tmp_path / "a.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
