"""A wrong NATS password is not retried twice a second for ever: after authentication
errors lobbyd waits longer and longer between attempts (up to 30 s), and says so once
per step. Counted from a real nats-server's log, in a fixed window."""

from __future__ import annotations

import time

from conftest import NatsServer, wait_for

WINDOW = 15.0


def test_a_wrong_password_backs_off(lobbyd, tmp_path) -> None:
    nats = NatsServer(tmp_path, extra=["--user", "lobby", "--pass", "right-pass"],
                      client_auth={"user": "lobby", "pass": "right-pass"}).start()
    try:
        d = lobbyd("auth.backoff", nats=nats, start=False,
                   NATS_URL=f"nats://lobby:wrong-pass@127.0.0.1:{nats.port}")
        d.start(wait=False)
        wait_for(lambda: d.request("GET", "/v1/health")[0] == 503, timeout=15,
                 what="the API up, NATS refused")

        def violations() -> int:
            return nats.log.read_text(errors="replace").count("authentication error")

        wait_for(violations, timeout=10, what="the first refused attempt")
        first = violations()
        time.sleep(WINDOW)  # a window counted, not timed: attempts in it are bounded
        attempts = violations() - first
        assert d.proc is not None and d.proc.poll() is None
        assert attempts <= 6, f"{attempts} refused attempts in {WINDOW:.0f} s"
        log = d.logs()
        assert "wrong-pass" not in log
        assert log.count("authentication") <= 8, log[-2000:]
    finally:
        nats.stop()
