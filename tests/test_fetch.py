"""leo.data.raw.fetch: local copies, resumable HTTP downloads from a local server, sha256 checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from leo.data.raw.fetch import (
    FileSpec,
    fetch_all,
    part_path,
    read_source,
    tree_sha256,
)
from leo.utils.errors import LeoInputError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """A local HTTP server with Range support and switchable misbehaviour."""

    def __init__(self) -> None:
        self.files = {"/data.bin": PAYLOAD}
        self.ranges: list[str | None] = []  # the Range header of every request
        self.ignore_range = False
        self.drop_after: int | None = None  # close the first response after this many bytes
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                body = server.files.get(self.path)
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                part = body[start:]
                if server.drop_after is not None:
                    part, server.drop_after = part[: server.drop_after], None
                    self.close_connection = True
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


def _fetch(specs, tmp_path, **kw):
    kw.setdefault("partial_dir", tmp_path / "partial")
    return fetch_all("test", specs, tmp_path / "raw", retries=2, backoff=0.0, timeout=5, **kw)


def test_download_from_url_writes_file_and_source(server, tmp_path):
    spec = FileSpec("data.bin", SHA, url=f"{server.url}/data.bin")
    source = _fetch([spec], tmp_path)
    assert (tmp_path / "raw" / "data.bin").read_bytes() == PAYLOAD
    written = json.loads((tmp_path / "raw" / "SOURCE.json").read_text())
    assert written == source
    assert written["files"][0] == {
        "name": "data.bin",
        "sha256": SHA,
        "kind": "file",
        "url": spec.url,
    }
    assert not part_path(tmp_path / "partial", spec).exists()


def test_partial_download_is_resumed_with_a_range_request(server, tmp_path):
    spec = FileSpec("data.bin", SHA, url=f"{server.url}/data.bin")
    part = part_path(tmp_path / "partial", spec)
    part.parent.mkdir()
    part.write_bytes(PAYLOAD[:300_000])
    _fetch([spec], tmp_path)
    assert server.ranges == ["bytes=300000-"]
    assert (tmp_path / "raw" / "data.bin").read_bytes() == PAYLOAD


def test_dropped_connection_is_retried_and_resumed(server, tmp_path):
    server.drop_after = 100_000
    spec = FileSpec("data.bin", SHA, url=f"{server.url}/data.bin")
    _fetch([spec], tmp_path)
    assert server.ranges == [None, "bytes=100000-"]
    assert (tmp_path / "raw" / "data.bin").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.ignore_range = True
    spec = FileSpec("data.bin", SHA, url=f"{server.url}/data.bin")
    part = part_path(tmp_path / "partial", spec)
    part.parent.mkdir()
    part.write_bytes(b"x" * 5000)
    _fetch([spec], tmp_path)
    assert (tmp_path / "raw" / "data.bin").read_bytes() == PAYLOAD


def test_stale_part_that_fails_the_checksum_is_downloaded_again(server, tmp_path):
    spec = FileSpec("data.bin", SHA, url=f"{server.url}/data.bin")
    part = part_path(tmp_path / "partial", spec)
    part.parent.mkdir()
    part.write_bytes(b"\0" * 1000)  # wrong bytes: resuming gives a bad file
    _fetch([spec], tmp_path)
    assert server.ranges == ["bytes=1000-", None]
    assert (tmp_path / "raw" / "data.bin").read_bytes() == PAYLOAD


def test_url_checksum_mismatch_names_file_and_both_hashes_and_leaves_nothing(server, tmp_path):
    wrong = "0" * 64
    spec = FileSpec("data.bin", wrong, url=f"{server.url}/data.bin")
    with pytest.raises(LeoInputError) as err:
        _fetch([spec], tmp_path)
    msg = str(err.value)
    assert "data.bin" in msg and wrong in msg and SHA in msg
    assert not (tmp_path / "raw").exists()
    assert not part_path(tmp_path / "partial", spec).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "partial"] == []


def test_http_404_is_one_clear_error(server, tmp_path):
    spec = FileSpec("gone.bin", SHA, url=f"{server.url}/gone.bin")
    with pytest.raises(LeoInputError, match=r"gone\.bin: HTTP 404"):
        _fetch([spec], tmp_path)
    assert not (tmp_path / "raw").exists()


def test_local_copy_is_a_copy_and_wins_over_the_url(tmp_path):
    data_dir = tmp_path / "shared"
    (data_dir / "ds").mkdir(parents=True)
    (data_dir / "ds" / "data.bin").write_bytes(PAYLOAD)
    spec = FileSpec("data.bin", SHA, url="http://127.0.0.1:9/never-used")
    source = _fetch([spec], tmp_path, data_dir=data_dir, subdir="ds")
    out = tmp_path / "raw" / "data.bin"
    assert not out.is_symlink() and out.read_bytes() == PAYLOAD
    assert source["files"][0] == {
        "name": "data.bin",
        "sha256": SHA,
        "kind": "file",
        "url": spec.url,
    }  # the same as after a download


def test_local_mismatch_leaves_the_previous_output_untouched(tmp_path):
    (tmp_path / "shared" / "ds").mkdir(parents=True)
    (tmp_path / "shared" / "ds" / "a.bin").write_bytes(b"good")
    (tmp_path / "shared" / "ds" / "b.bin").write_bytes(b"tampered")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "old.txt").write_text("previous run")
    specs = [
        FileSpec("a.bin", hashlib.sha256(b"good").hexdigest()),
        FileSpec("b.bin", hashlib.sha256(b"original").hexdigest()),
    ]
    with pytest.raises(LeoInputError, match=r"b\.bin: sha256 mismatch"):
        _fetch(specs, tmp_path, data_dir=tmp_path / "shared", subdir="ds")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "shared"]


def test_no_source_and_missing_sha_are_named(tmp_path):
    with pytest.raises(LeoInputError, match=r"x\.zip: not found locally .*'k\[0\]\.url' is not"):
        _fetch([FileSpec("x.zip", SHA)], tmp_path, key="k")
    with pytest.raises(LeoInputError, match=r"nope: data directory not found"):
        _fetch([FileSpec("x.zip", SHA)], tmp_path, data_dir=tmp_path / "nope")
    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "s" / "x.zip").write_bytes(PAYLOAD)
    with pytest.raises(LeoInputError, match=rf"'k\[0\]\.sha256' is not set .*{SHA}"):
        _fetch([FileSpec("x.zip", "")], tmp_path, key="k", data_dir=tmp_path / "d", subdir="s")


def test_directory_source_hash_matches_sha256sum_listing(tmp_path):
    tree = tmp_path / "mini"
    (tree / "images").mkdir(parents=True)
    (tree / "train.csv").write_text("filename,label\n")
    (tree / "images" / "b.jpg").write_bytes(b"bbb")
    (tree / "images" / "a.jpg").write_bytes(b"aaa")
    if shutil.which("sha256sum") and shutil.which("find"):
        shell = subprocess.run(
            "find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum",
            shell=True,
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
        assert tree_sha256(tree) == shell
    source = _fetch([FileSpec("mini", tree_sha256(tree), path=str(tree))], tmp_path)
    assert (tmp_path / "raw" / "mini" / "images" / "a.jpg").read_bytes() == b"aaa"
    assert source["files"][0]["kind"] == "directory"
    assert read_source(tmp_path / "raw")["dataset"] == "test"


def test_read_source_detects_a_changed_raw_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"abc")
    _fetch(
        [FileSpec("a.bin", hashlib.sha256(b"abc").hexdigest())],
        tmp_path,
        data_dir=tmp_path,
        subdir="src",
    )
    (tmp_path / "raw" / "a.bin").write_bytes(b"abd")
    with pytest.raises(LeoInputError, match=r"a\.bin: sha256 mismatch"):
        read_source(tmp_path / "raw")
