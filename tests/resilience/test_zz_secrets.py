"""Bad input 11 of issue 4, the sweep: no secret (TOKEN, NATS password, NATS token) appears
in any file the whole suite left behind — every lobbyd log, every captured output. Runs
last (file name order)."""

from __future__ import annotations

from .conftest import SECRETS, record


def test_no_secret_in_any_log_of_the_suite(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    scanned, leaks = 0, []
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.name.startswith("nats-"):
            continue  # nats-server's own logs are not ours
        try:
            if path.stat().st_size > 64 << 20:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        scanned += 1
        leaks += [(str(path.relative_to(base)), s) for s in SECRETS if s.encode() in data]
    record("11 secrets sweep", files_scanned=scanned, leaks=len(leaks))
    assert scanned > 0
    assert not leaks, f"secrets found in suite output: {leaks[:10]}"
