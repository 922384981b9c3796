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


#: The demo as `nox -s demo` runs it, in a process group of its own like a terminal's job.
DEMO_CHILD = """\
import json, sys
sys.path.insert(0, sys.argv[1])
import noxfile
lobbyd, nats, workdir, nats_port, a, b = json.loads(sys.argv[2])
noxfile.run_demo(lobbyd, nats, noxfile.Path(workdir), nats_port, (a, b))
"""


@pytest.mark.parametrize("round_", range(3))
def test_ctrl_c_both_daemons_say_goodbye_before_nats_stops(tmp_path: Path, round_: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: NATS must not be one of
    them, or a daemon finds it gone before its goodbye (it raced and lost in CI)."""
    import json
    import subprocess

    args = [lobbyd_command(), nats_server_binary(), str(tmp_path / "demo"), free_port(),
            free_port(), free_port()]
    demo = subprocess.Popen([sys.executable, "-c", DEMO_CHILD, str(ROOT), json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    out: list[str] = []
    try:
        for line in demo.stdout:
            out.append(line)
            if "Ctrl-C stops the demo" in line:
                break
        os.killpg(demo.pid, signal.SIGINT)
        out.append(demo.stdout.read())
        status = demo.wait(timeout=30)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    text = "".join(out)
    # The race is seldom lost on an idle machine; what NATS was sent is certain.
    nats_log = (tmp_path / "demo" / "nats-server.log").read_text()
    assert 'Trapped "interrupt" signal' not in nats_log, nats_log
    assert 'Trapped "terminated" signal' in nats_log, nats_log
    assert "said goodbye as alpha.demo" in text and "said goodbye as beta.demo" in text, text
    assert "cut off from NATS" not in text and "Traceback" not in text, text
    assert status == 0, text
