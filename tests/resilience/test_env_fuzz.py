"""Bad input 10 of issue 4: every environment variable with random bytes, huge values and
negative/zero/overflow numbers. lobbyd either starts correctly (API up, clean exit 0 on
SIGTERM) or exits 78 with one clear line naming the variable: never a traceback.

No value here can make the daemon talk to anything but loopback: NATS_URL and HOST only get
loopback or unusable values, LABELS_PATH stays inside the test's directory."""

from __future__ import annotations

import http.client
import random
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import (
    base_env,
    free_port,
    lobbyd_command,
    sigterm_and_wait,
    skip_unless_required,
)

from .conftest import SECRET_NATS_PASS, SECRET_NATS_TOKEN, SECRET_TOKEN, SECRETS, record

EX_CONFIG = 78
NUMERIC = ["CLEAN_EVERY", "KEEP_ALIVE", "TTL", "NODE_EXPORTER_PORT", "CALLBACK_COOLDOWN",
           "CALLBACK_FIRST_RUN_DELAY", "CALLBACK_TIMEOUT", "PORT"]
BOOLS = ["DISABLE_API", "REGISTER"]
TEXT = ["TOKEN", "DRIVER", "NATS_DISCOVERY_CHANNEL", "LABELS", "RUNTIME_LABELS_FILENAME",
        "HOSTNAME", "CALLBACK", "LOG_LEVEL"]
NUMBERS = ["0", "-1", "1", "65535", "65536", "86401", "99999999999999999999999", "1e3",
           "0x10", " 5 ", "+5", "5.0", "\u0663", "1_000", "NaN", "inf", "-0", "00005",
           "9" * 5000, "\u00b2", "5s", "1,000"]
BOOL_VALUES = ["maybe", "TRUE ", "yes", "No", "on", "2", "-1", "t", "fal", "\u0661", "ja"]


def random_values(rng: random.Random, n: int) -> list[bytes]:
    """Random bytes (no NUL: an environment cannot hold one), some invalid UTF-8."""
    out = []
    for _ in range(n):
        size = rng.choice([1, 3, 10, 40, 300])
        out.append(bytes(rng.randint(1, 255) for _ in range(size)))
    return out


def huge(ch: str) -> bytes:
    return (ch * 60_000).encode()  # under MAX_ARG_STRLEN (128 KiB) even for 2-byte chars


def cases(tmp: Path) -> list[tuple[str, bytes]]:
    rng = random.Random(10)
    out: list[tuple[str, bytes]] = []
    for name in NUMERIC:
        values = NUMBERS if name in ("TTL", "PORT") else NUMBERS[::3]
        out += [(name, v.encode()) for v in values]
        out += [(name, v) for v in random_values(rng, 3)]
    for name in BOOLS:
        out += [(name, v.encode()) for v in BOOL_VALUES]
        out += [(name, v) for v in random_values(rng, 3)]
    for name in TEXT:
        out += [(name, v) for v in random_values(rng, 4)]
        out += [(name, huge("a")), (name, huge(",")), (name, huge("\u00e9")),
                (name, b"\xff\xfe"), (name, b" \t "), (name, b"a\nb"), (name, b"\x1b[31mred")]
    out += [("LABELS", b"ok:1,," + b"x" * 1025), ("LABELS", b"a\x7fb"),
            ("LABELS", b",".join(b"l:%d" % i for i in range(1001)))]
    # values that can never leave loopback
    for v in [b"", b"nats://", b"http://127.0.0.1:4222", b"nats://127.0.0.1:0",
              b"nats://127.0.0.1:99999", b"nats://127.0.0.1:-1", b"nats://[::1",
              b",,,", b"nats://127.0.0.1:1,", b"nats://127.0.0.1:abc", b"tls://127.0.0.1:1",
              b"nats://\xff\xfe:1", b"nats://127.0.0.1:1/" + huge("a"),
              b"nats://127.0.0.1:1?x=\x01", b"\x01\x02\x03"]:
        out.append(("NATS_URL", v))
    # (no value that looks like a host name: resolving it would query a DNS server)
    for v in [b"", b"::", b"[::1]", b"127.0.0.1:80", b"-1", b"\x01", b"127.0.0.1 ",
              huge("1"), b"\xff", b"a_b"]:
        out.append(("HOST", v))
    for v in [b"", b"/dev/null", b"/proc/self", str(tmp / "a-file").encode(),
              (str(tmp) + "/\xff\xfe").encode("latin-1"), (str(tmp) + "/x" * 2000).encode()]:
        out.append(("LABELS_PATH", v))
    return out


def secret_cases() -> list[tuple[str, bytes]]:
    """Values that carry a secret (TOKEN, NATS password, NATS token), good and broken:
    the daemon's output (at DEBUG) must never show it, whether it starts or refuses."""
    token, pw, ntok = (s.encode() for s in (SECRET_TOKEN, SECRET_NATS_PASS, SECRET_NATS_TOKEN))
    nobody = str(free_port()).encode()
    return [
        ("TOKEN", token), ("TOKEN", token + b"\x01"), ("TOKEN", b" " + token + b"\t"),
        ("TOKEN", token + b"\xff"), ("TOKEN", token * 2000),
        ("NATS_URL", b"nats://lobby:" + pw + b"@127.0.0.1:" + nobody),
        ("NATS_URL", b"nats://" + ntok + b"@127.0.0.1:" + nobody),
        ("NATS_URL", b"nats://lobby:" + pw + b"@127.0.0.1:99999"),
        ("NATS_URL", b"nats://lobby:" + pw + b"@127.0.0.1:abc"),
        ("NATS_URL", b"nats://lobby:" + pw + b"@[::1"),
        ("NATS_URL", b"http://lobby:" + pw + b"@127.0.0.1:1"),
        ("NATS_URL", b"nats://lobby:" + pw + b"\x01@127.0.0.1:1"),
        ("NATS_URL", b"nats://lobby:" + pw + b"\xff@127.0.0.1:1"),
        ("NATS_URL", b"nats://127.0.0.1:1,nats://" + ntok + b"@127.0.0.1:" + nobody),
    ]


def has_secret(value: bytes) -> bool:
    return any(s.encode() in value for s in SECRETS)


def run_case(tmp: Path, i: int, name: str, value: bytes) -> dict:
    work = tmp / f"case{i}"
    work.mkdir()
    (tmp / "a-file").touch()
    port = free_port()
    env = {k.encode(): v.encode() for k, v in base_env().items()}
    env.update({b"HOSTNAME": b"envfuzz", b"PORT": str(port).encode(),
                b"NATS_URL": f"nats://127.0.0.1:{free_port()}".encode(),  # nobody there
                b"LABELS_PATH": str(work / "labels").encode()})
    env[name.encode()] = value
    if has_secret(value):
        env[b"LOG_LEVEL"] = b"DEBUG"  # everything the daemon could say about it
    log = work / "out.log"
    with open(log, "wb") as out, open(work / "err.log", "wb") as err:
        proc = subprocess.Popen(lobbyd_command(), env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, cwd=work)
        api = None
        if name in ("PORT", "HOST", "DISABLE_API"):  # no known API address to probe:
            # until it exits or logs that it runs (it listens before it says so)
            deadline = time.monotonic() + 15
            while proc.poll() is None and time.monotonic() < deadline and not re.search(
                    rb"starting as|API disabled", log.read_bytes() + (work / "err.log")
                    .read_bytes()):
                time.sleep(0.05)
        else:
            api = wait_api(port, proc, timeout=15)
        started = proc.poll() is None
        code, hung = sigterm_and_wait(proc)
        if hung:
            code = f"hung after SIGTERM ({code})"
    stdout = log.read_bytes()
    stderr = (work / "err.log").read_bytes()
    return {"name": name, "value": value[:80], "started": started, "code": code, "api": api,
            "stderr": stderr, "stdout": stdout, "secret": has_secret(value)}


def wait_api(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    """The API answers (any HTTP status: TOKEN may be set) before the process exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/v1/discovery")
            if conn.getresponse().status < 500:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def test_environment_fuzz(tmp_path):
    all_cases = cases(tmp_path) + secret_cases()
    results: list[dict] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(item):
        i, (name, value) = item
        if time.monotonic() - t0 > 300:
            return
        res = run_case(tmp_path, i, name, value)
        with lock:
            results.append(res)

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(one, enumerate(all_cases)))
    problems = []
    for r in results:
        text = (r["stdout"] + r["stderr"]).decode("utf-8", "replace")
        where = f"{r['name']}={r['value']!r}"
        if "Traceback" in text:
            problems.append(f"{where}: traceback: {text[-600:]}")
            continue
        if r["started"]:
            if r["code"] != 0:
                problems.append(f"{where}: started but exit {r['code']} on SIGTERM")
            if r["api"] is False:
                problems.append(f"{where}: started but the API never answered")
        else:
            lines = [ln for ln in r["stderr"].decode("utf-8", "replace").splitlines() if ln]
            port_taken = r["name"] == "PORT" and r["code"] == 1 and len(lines) == 1 and \
                "address already in use" in lines[0]
            if port_taken:
                continue  # not a configuration error: someone else holds that port
            if r["code"] != EX_CONFIG:
                problems.append(f"{where}: exit {r['code']} (want 78): {text[-300:]}")
            elif len(lines) != 1 or r["name"] not in lines[0] or len(lines[0]) > 400:
                problems.append(f"{where}: not one clear line naming {r['name']}: {lines[:3]}")
        for secret in SECRETS:
            if secret in text:
                problems.append(f"{where}: a secret in the output")
    started = sum(1 for r in results if r["started"])
    with_secret = [r for r in results if r["secret"]]
    record("10 environment fuzz", cases=len(results), planned=len(all_cases),
           started=started, exit_78=sum(1 for r in results if r["code"] == EX_CONFIG
                                         and not r["started"]),
           tracebacks=sum(1 for p in problems if "traceback" in p), problems=len(problems),
           secret_cases=len(with_secret),
           secret_cases_started=sum(1 for r in with_secret if r["started"]),
           secrets_shown=sum(1 for p in problems if "a secret in the output" in p),
           duration_s=round(time.monotonic() - t0, 1))
    assert len(results) == len(all_cases), "ran out of time before every case ran"
    # the secret check had something to check: cases that started and cases refused
    assert with_secret and any(r["started"] for r in with_secret) and \
        any(not r["started"] for r in with_secret), [(r["name"], r["code"]) for r in with_secret]
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:15])


def isolated(cmd: list[str]) -> list[str]:
    """cmd in a network namespace of its own (only loopback): a name lookup there cannot
    leave the machine. Skips where namespaces are not allowed (fails under
    LOBBYD_REQUIRE_ALL=1, as in CI)."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        skip_unless_required("unshare -n not permitted here")
    return ["unshare", "-n", "--", *cmd]


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::1", "256.1.1.1", "1.2.3.4.5",
                                  "::1%nosuchif"])
def test_unusable_host_is_a_config_error(tmp_path, host):
    """HOST that is no address of this machine, or no address at all, can never work:
    exit 78 (no systemd restart loop), one clear line naming HOST. Run in an empty network
    namespace where needed, so a lookup of a bogus name goes nowhere."""
    env = base_env()
    env.update({"HOST": host, "PORT": str(free_port()), "HOSTNAME": "bind.test",
                "NATS_URL": f"nats://127.0.0.1:{free_port()}",
                "LABELS_PATH": str(tmp_path / "labels")})
    # names that are no IP address would be looked up: only in a namespace without network
    cmd = lobbyd_command() if host in ("192.0.2.1", "2001:db8::1") else \
        isolated(lobbyd_command())
    try:
        res = subprocess.run(cmd, env=env, capture_output=True,
                             text=True, timeout=15, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"HOST={host}: still running after 15 s, no exit 78: "
                             f"{(exc.stderr or b'')[-300:]!r}") from None
    (tmp_path / "out.log").write_text(res.stdout + res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr
    assert len(lines) == 1 and "HOST" in lines[0], lines
    assert res.returncode == EX_CONFIG, f"exit {res.returncode}: {lines}"


def test_minimal_env_starts(tmp_path):
    """Only PATH, PORT and LABELS_PATH set (as under env -i): defaults all round; it starts
    although no NATS is there, and exits 0 on SIGTERM."""
    env = base_env()
    env["LABELS_PATH"] = str(tmp_path / "labels")  # /etc/lobby/labels is not ours to create
    env["PORT"] = str(free_port())
    proc = subprocess.Popen(lobbyd_command(), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        assert wait_api(int(env["PORT"]), proc, timeout=15), \
            f"API never answered (exit {proc.poll()})"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=5)
    assert proc.returncode == 0 and b"Traceback" not in out, out[-500:]
