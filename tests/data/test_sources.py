"""Which files `llm.data.sources` accepts as a corpus: regular files only, within the size cap, no loops."""

from __future__ import annotations

import glob
import os
import signal
import socket

import pytest

from llm.data.readers import iter_documents
from llm.data.sources import expand_glob, read_regular, resolve_files
from llm.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_hang():
    """A refusal that regressed into a blocking read would hang the suite: fail after 20 s instead."""
    def fail(*_):
        raise AssertionError("blocked on a data file")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def corpus(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.txt").write_text("beta\n")
    return root


def refused(path, *fragments, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        files = resolve_files(str(path), **kwargs)
        list(iter_documents(files, **{k: v for k, v in kwargs.items() if k == "max_file_bytes"}))
    message = str(info.value)
    assert message.startswith("data.") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_fifo_in_a_directory_or_by_name_is_refused_not_read(tmp_path):
    root = corpus(tmp_path / "c")
    os.mkfifo(root / "sub" / "pipe.txt")
    refused(root, "pipe.txt", "not a regular file (a FIFO)")
    refused(root / "sub" / "pipe.txt", "not a regular file (a FIFO)")
    refused(str(root / "**" / "*.txt"), "pipe.txt", "a FIFO")
    # Opened non-blocking and checked on the descriptor: a path swapped for a FIFO after listing cannot block.
    with pytest.raises(ConfigError, match="a FIFO"):
        read_regular(root / "sub" / "pipe.txt")


def test_devices_and_sockets_are_refused(tmp_path):
    refused("/dev/zero", "'/dev/zero' is not a regular file (a character device)")
    (tmp_path / "d").mkdir()
    os.symlink("/dev/zero", tmp_path / "d" / "zero.txt")  # a link to a device is the device
    refused(tmp_path / "d", "zero.txt", "a character device")
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(sock_dir / "sock.txt"))
        refused(sock_dir, "sock.txt", "a socket")
    finally:
        server.close()


def test_files_over_the_cap_are_refused_before_reading(tmp_path):
    root = corpus(tmp_path / "c")
    (root / "big.txt").write_text("x" * 100)
    refused(root, "big.txt", "100 bytes, over data.max_file_bytes=50", max_file_bytes=50)
    assert [os.path.basename(f.path) for f in resolve_files(str(root), max_file_bytes=100)] == [
        "a.txt", "big.txt", "b.txt"]
    with pytest.raises(ConfigError, match="must be >= 0"):
        resolve_files(str(root), max_file_bytes=-1)


def test_a_file_that_grows_past_the_cap_after_listing_is_caught(tmp_path):
    root = corpus(tmp_path / "c")
    files = resolve_files(str(root), max_file_bytes=10)
    (root / "a.txt").write_text("alpha\n" * 10)
    with pytest.raises(ConfigError, match="a.txt.* bytes, over data.max_file_bytes=10"):
        list(iter_documents(files, max_file_bytes=10))


def test_directory_loops_are_refused_in_walks_and_globs(tmp_path):
    root = corpus(tmp_path / "c")
    os.symlink("..", root / "sub" / "loop")
    os.symlink("..", root / "sub" / "loop2")  # two loops: Python's glob would take 2**40 paths
    refused(root, "loop", "directory loop")
    refused(str(root / "**" / "*.md"), "directory loop")


def test_linked_directories_are_followed_once(tmp_path):
    data = corpus(tmp_path / "data")
    root = tmp_path / "c"
    root.mkdir()
    (root / "own.txt").write_text("own\n")
    os.symlink(data, root / "linked")
    names = [os.path.relpath(f.path, root) for f in resolve_files(str(root))]
    assert names == ["linked/a.txt", "linked/sub/b.txt", "own.txt"]


def test_expand_glob_matches_glob_where_there_is_no_loop(tmp_path, monkeypatch):
    root = corpus(tmp_path / "c")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.txt").write_text("h")
    (root / "sub" / "n.md").write_text("n")
    for pattern in ["**/*.txt", "*", "sub/*.md", "*/*.txt", "**/sub", "nope/*", ".hidden/*"]:
        full = str(root / pattern)
        assert sorted(expand_glob(full)) == sorted(glob.glob(full, recursive=True)), pattern
    monkeypatch.chdir(root)  # relative patterns keep their relative form
    assert sorted(expand_glob("**/*.txt")) == sorted(glob.glob("**/*.txt", recursive=True))


def test_regular_files_still_read(tmp_path):
    root = corpus(tmp_path / "c")
    (root / "d.jsonl").write_text('{"text": "gamma"}\n')
    docs = list(iter_documents(resolve_files(str(root), max_file_bytes=1 << 20), max_file_bytes=1 << 20))
    assert docs == ["alpha\n", "gamma", "beta\n"]


def test_a_directory_read_as_a_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file \\(a directory\\)"):
        read_regular(tmp_path)
