"""Subscribe to a NATS subject and print every payload, one per line, for a while.

    python watch_nats.py HOST PORT SUBJECT SECONDS

Prints READY once subscribed. The boot test runs it inside the container's
network namespace (nsenter --net) to see the goodbye of `systemctl stop`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: natsraw

from natsraw import RawNats


def main() -> None:
    host, port, subject, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    deadline = time.monotonic() + 10
    while True:
        try:
            nc = RawNats(host, port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    nc.subscribe(subject)
    print("READY", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _, payload in nc.messages(min(0.5, end - time.monotonic())):
            print(payload.decode(errors="replace"), flush=True)
    nc.close()


if __name__ == "__main__":
    main()
