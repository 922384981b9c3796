"""Small doors of the HTTP parser and the runtime labels file: request heads with
characters str.isdigit()/str.strip() let through, chunk sizes with white space,
trailers without end; a link planted at the runtime file's temp name; and a directory
that cannot be synced after the rename (the labels are saved: the answer says so)."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

import lobbyd as L

# --------------------------------------------------------------------------- pure


def head(*lines: str) -> bytes:
    return "\r\n".join(("POST /v1/labels HTTP/1.1", *lines)).encode("latin-1")


@pytest.mark.parametrize("line, status", [
    ("Content-Length: \u00b2", 400), ("Content-Length: 1\u00b9", 400),  # ² and ¹
    ("Content-Length: +5", 400), ("Content-Length: 5", None),
    ("Transfer-Encoding:\x0bchunked", 400), ("Transfer-Encoding: chunked\x0c", 400),
    ("Transfer-Encoding: chunked\xa0", 501), ("Transfer-Encoding: \tchunked\t", None),
    ("X-A: a\x00b", 400), ("X-A: a\x7fb", 400), ("X-A: a\x1bb", 400), ("X-A: a\tb", None),
])
def test_header_values_are_exact(line: str, status: int | None) -> None:
    try:
        L.body_length(L.parse_request_head(head("Host: localhost", line)))
    except L.HttpError as exc:
        assert exc.status == status, (line, exc.status, exc.message)
    else:
        assert status is None, line


def test_a_directory_sync_that_fails_says_the_file_is_new(tmp_path: Path, monkeypatch) -> None:
    """fsync of the directory fails (EIO) after the rename: NotDurable, an OSError, and
    the file already holds the new text (what the API answer then says)."""
    path = tmp_path / "_runtime"
    path.write_text("old:1\n")
    real = os.fsync

    def failing_for_directories(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", failing_for_directories)
    with pytest.raises(L.NotDurable) as caught:
        L.write_atomically(path, "new:1\n")
    assert caught.value.errno == errno.EIO and isinstance(caught.value, OSError)
    assert path.read_text() == "new:1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["_runtime"]


# --------------------------------------------------------------------------- raw HTTP


def exchange(port: int, data: bytes) -> bytes:
    """Everything lobbyd answers to `data` until it closes (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ")[1])


def test_malformed_heads_get_an_answer(lobbyd) -> None:
    a = lobbyd("doors.http")
    cases = [(b"Content-Length: \xc2\xb2\r\n", 400),  # ² in UTF-8; in latin-1 "Â²"
             ("Content-Length: \u00b2\r\n".encode("latin-1"), 400),
             (b"Transfer-Encoding:\x0bchunked\r\n", 400),
             (b"Transfer-Encoding: chunked\xa0\r\n", 501),
             (b"X-Note: a\x00b\r\n", 400), (b"X-Note: a\x7f\r\n", 400)]
    for extra, want in cases:
        answer = exchange(a.port, b"POST /v1/labels HTTP/1.1\r\nHost: localhost\r\n" + extra +
                          b"Connection: close\r\n\r\nrole:x")
        assert status_of(answer) == want, (extra, answer[:300])
        assert answer.split(b"\r\n\r\n", 1)[1], "an error answer says why"
    assert "role:x" not in a.get_json("/v1/discovery")["labels"]  # type: ignore[index]
    assert "Traceback" not in a.logs()


def chunked(*pieces: bytes) -> bytes:
    return (b"POST /v1/labels HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + b"".join(pieces))


def test_chunk_sizes_are_exact_and_trailers_bounded(lobbyd) -> None:
    a = lobbyd("doors.chunked")
    assert status_of(exchange(a.port, chunked(b"5 \r\nrole:\r\n0\r\n\r\n"))) == 400
    assert status_of(exchange(a.port, chunked(b" 5\r\nrole:\r\n0\r\n\r\n"))) == 400
    big = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 1000) for i in range(20))
    assert status_of(exchange(a.port, chunked(b"6\r\nrole:a\r\n0\r\n", big, b"\r\n"))) == 431
    assert "role:a" not in a.get_json("/v1/discovery")["labels"]  # type: ignore[index]
    # what is right still works: an extension after white space, a small trailer
    answer = exchange(a.port, chunked(b"6 ;x=1\r\nrole:b\r\n0\r\nX-T: 1\r\n\r\n"))
    assert status_of(answer) == 200, answer
    assert "role:b" in a.get_json("/v1/discovery")["labels"]  # type: ignore[index]


# --------------------------------------------------------------------------- the temp file


def session_pids(leader: int) -> list[int]:
    """The daemon's processes (a static binary is a chain of three)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == leader:  # the session id
                pids.append(int(entry.name))
    return pids


def test_a_link_at_the_temp_name_is_not_followed(lobbyd, tmp_path) -> None:
    labels = tmp_path / "labels-doors.link"
    labels.mkdir()
    a = lobbyd("doors.link", LABELS_PATH=str(labels))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pids = session_pids(a.proc.pid)  # type: ignore[union-attr]
    assert pids
    for pid in pids:  # the name a write would use: .NAME.PID.tmp
        os.symlink(victim, labels / f"._runtime.{pid}.tmp")
    assert a.request("POST", "/v1/labels", "role:linked")[0] == 200
    assert victim.read_text() == "precious\n"
    assert (labels / "_runtime").read_text() == "role:linked\n"
    assert not (labels / "_runtime").is_symlink()


def test_the_answer_says_the_labels_are_saved_when_only_the_sync_failed() -> None:
    """Api's answer to NotDurable: a 500 that says what is true (saved and published)."""
    import asyncio
    from types import SimpleNamespace

    async def not_durable(add: object, remove: object) -> None:
        raise L.NotDurable(errno.EIO, os.strerror(errno.EIO))

    async def full(add: object, remove: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    config = SimpleNamespace(token="", port=1313, host="127.0.0.1", http_allowed_hosts=())
    for change, status, words in [(not_durable, 500, ("saved", "published", "power loss")),
                                  (full, 507, ("nothing was changed",))]:
        local = SimpleNamespace(hostname="me", change_runtime_labels=change,
                                runtime=SimpleNamespace(path=Path("/labels/_runtime")))
        registry = L.Registry(ttl=3600)
        watch = L.Watchers(registry, lambda: L.Packet("me", ()), lambda: None, 9100)
        answers = L.Answers(registry, watch, lambda: None, 9100)
        api = L.Api(config, answers, watch, local, None)  # type: ignore[arg-type]
        with pytest.raises(L.HttpError) as caught:
            asyncio.run(api.change_labels(["role:x"], ()))
        assert caught.value.status == status
        assert all(word in caught.value.message for word in words), caught.value.message
        if status == 500:
            assert "nothing was changed" not in caught.value.message
