"""The CALLBACK script: initial state after the first-run delay, changes, cooldown."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from conftest import wait_for

SUBJECT = "lobby.discovery"


def recorder(tmp_path: Path, exit_code: int = 0) -> tuple[str, Path]:
    """A callback script that appends one line per run: start time, end time, stdin."""
    out = tmp_path / "runs.jsonl"
    script = tmp_path / "record.py"
    script.write_text(
        "import json, sys, time\n"
        "start = time.time()\n"
        "data = json.load(sys.stdin)\n"
        "time.sleep(0.2)\n"
        f"with open({str(out)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'start': start, 'end': time.time(), 'hosts': "
        "[d['hostname'] for d in data]}) + '\\n')\n"
        "print('recorded', len(data))\n"
        f"sys.exit({exit_code})\n")
    return f"{sys.executable} {script}", out


def runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def hi(pub, name: str, labels: list[str] | None = None) -> None:
    pub.publish_json(SUBJECT, {"discovery": {"hostname": name, "labels": labels or []},
                               "message": "hi"})


def test_callback_gets_the_registry_with_delay_cooldown_and_coalescing(lobbyd, nats, tmp_path):
    command, out = recorder(tmp_path)
    started = time.time()
    a = lobbyd("a", CALLBACK=command, CALLBACK_FIRST_RUN_DELAY="2", CALLBACK_COOLDOWN="2",
               TTL="30")
    pub = nats.client()
    hi(pub, "early")
    pub.flush()
    first = wait_for(lambda: runs(out), timeout=10, what="first callback run")[0]
    assert first["start"] >= started + 2  # honours the first-run delay
    assert first["hosts"] == ["a", "early"]  # the initial state
    # a burst of changes during the cooldown is coalesced into one run
    for i in range(5):
        hi(pub, f"burst{i}")
    pub.flush()
    second = wait_for(lambda: runs(out)[1:], timeout=10, what="second run")[0]
    assert second["start"] >= first["end"] + 2 - 0.05  # cooldown from the end of the last run
    time.sleep(0.5)  # let a possible (wrong) extra run show up
    assert len(runs(out)) == 2
    assert second["hosts"] == ["a", "burst0", "burst1", "burst2", "burst3", "burst4", "early"]
    # a mere keep-alive is not a change
    hi(pub, "early")
    pub.flush()
    deadline = time.time() + 3
    while time.time() < deadline:
        assert len(runs(out)) == 2
        time.sleep(0.1)
    assert "exited 0; output: recorded 2" in a.logs()


def test_failing_and_missing_callbacks_do_not_hurt_the_daemon(lobbyd, nats, tmp_path):
    command, out = recorder(tmp_path, exit_code=3)
    a = lobbyd("a", CALLBACK=command, CALLBACK_FIRST_RUN_DELAY="0", CALLBACK_COOLDOWN="0")
    wait_for(lambda: runs(out), what="failing callback ran")
    wait_for(lambda: "exited 3" in a.logs(), what="exit status logged")
    missing = lobbyd("b", CALLBACK="/nonexistent/script --flag", CALLBACK_FIRST_RUN_DELAY="0")
    wait_for(lambda: "cannot start" in missing.logs(), what="missing script logged")
    assert a.request("GET", "/v1/discovery")[0] == 200
    assert missing.request("GET", "/v1/discovery")[0] == 200


def test_hanging_callback_is_killed_and_the_api_keeps_answering(lobbyd, tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(600)\n")
    a = lobbyd("a", CALLBACK=f"{sys.executable} {script}", CALLBACK_FIRST_RUN_DELAY="0",
               CALLBACK_TIMEOUT="1")
    for _ in range(10):
        assert a.request("GET", "/v1/discoveries")[0] == 200
    wait_for(lambda: "killed" in a.logs(), timeout=10, what="hanging callback killed")
