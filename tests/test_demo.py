"""`nox -s demo` (noxfile.run_demo) with real nats-server and lobbyd processes: it says
why a process could not start, and a stopped NATS does not end it."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, free_port, lobbyd_command, nats_server_binary, wait_for

sys.path.insert(0, str(ROOT))  # noxfile.py is at the root; the test sessions install nox
noxfile = pytest.importorskip("noxfile")  # needs nox, as the demo itself does


class Said:
    """What the demo prints, kept for the test (print's signature)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "", end: str = "\n") -> None:
        self.lines.append(text + end)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def test_nats_port_taken_says_why_and_no_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        said = Said()
        with pytest.raises(noxfile.DemoError) as failed:
            noxfile.run_demo(lobbyd_command(), nats_server_binary(), tmp_path / "demo",
                             taken.getsockname()[1], (free_port(), free_port()), say=said)
    assert "address already in use" in str(failed.value), failed.value
    assert "DEMO_NATS_PORT" in str(failed.value) and "lobbyd is running" not in said.text


def test_a_daemon_that_cannot_start_is_named_with_its_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(noxfile.DemoError) as failed:
            noxfile.run_demo(lobbyd_command(), nats_server_binary(), tmp_path / "demo",
                             free_port(), (free_port(), taken.getsockname()[1]), say=Said())
    message = str(failed.value)
    assert message.startswith("beta.demo exited with status 1;"), message
    assert "in use" in message, message


def test_stopping_nats_does_not_end_the_demo(tmp_path: Path) -> None:
    said, stop, errors = Said(), threading.Event(), []

    def run() -> None:
        try:
            noxfile.run_demo(lobbyd_command(), nats_server_binary(), tmp_path / "demo",
                             free_port(), (free_port(), free_port()), stop=stop, say=said)
        except Exception as exc:  # reported by the test
            errors.append(exc)

    demo = threading.Thread(target=run)
    demo.start()
    try:
        banner = wait_for(lambda: next((line for line in said.lines
                                        if "stop it to try an outage" in line), None),
                          timeout=30, what="the demo's banner")
        pid = int(str(banner).split("pid ")[1].split(":")[0])
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: "NATS (pid" in said.text and "keep serving" in said.text,
                 timeout=10, what="the demo saying NATS ended")
        wait_for(lambda: "disconnected from NATS" in said.text, timeout=10,
                 what="the daemons noticing")
        assert demo.is_alive() and not errors, (errors, said.text[-2000:])
    finally:
        stop.set()
        demo.join(timeout=20)
    assert not demo.is_alive() and not errors, errors
