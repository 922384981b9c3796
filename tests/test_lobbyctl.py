"""lobbyctl (SPEC 10): every command and flag against real daemons, as the Go client."""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Lobbyd, base_env, free_port, lobbyd_command, wait_for

import lobbyd as L


def ctl(*args: str, port: int | None = None, env: dict[str, str] | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess:
    """`lobbyd ctl ARGS` (the same program as lobbyctl), as a user's shell runs it."""
    full = base_env()
    if port is not None:
        full["PORT"] = str(port)
    full.update(env or {})
    return subprocess.run([*lobbyd_command(), "ctl", *args], env=full, capture_output=True,
                          text=True, timeout=timeout)


def ok(*args: str, port: int, **kw) -> str:
    done = ctl(*args, port=port, **kw)
    assert done.returncode == 0 and not done.stderr, (done.returncode, done.stderr)
    return done.stdout


@pytest.fixture
def fleet(lobbyd) -> tuple[Lobbyd, Lobbyd, Lobbyd]:
    a = lobbyd("a.example.com", LABELS="service:web,prometheus:node,prometheus:node:dc:prg")
    b = lobbyd("mail.example.com", LABELS="service:smtp,role:mx")
    c = lobbyd("c")
    wait_for(lambda: len(a.hostnames()) == 3, what="a sees the fleet")
    return a, b, c


def test_discoveries_print_as_the_go_client_does(fleet) -> None:
    a, _b, _c = fleet
    assert ok("discoveries", port=a.port) == (
        "   a.example.com    prometheus:node\n"
        "                    prometheus:node:dc:prg\n"
        "                    service:web\n"
        "\n"
        "c\n"
        "\n"
        "mail.example.com    role:mx\n"
        "                    service:smtp\n"
        "\n")
    assert ok("discoveries", "labels", "service:smtp", "role:none", port=a.port) == \
        "mail.example.com    service:smtp\n\n"
    assert ok("discoveries", "search", "service:", port=a.port) == (
        "   a.example.com    service:web\n\n"
        "mail.example.com    service:smtp\n\n")
    assert ok("discoveries", "labels", "nothing:here", port=a.port) == ""


def test_json_output_is_the_apis_json_on_one_line(fleet) -> None:
    a, _b, _c = fleet
    for args, path in ((["discoveries"], "/v1/discoveries"),
                       (["discoveries", "labels", "service:web,role:mx"],
                        "/v1/discoveries?labels=service:web,role:mx"),
                       (["discoveries", "search", "role"], "/v1/discoveries?prefixes=role"),
                       (["resolve", "service:web"], "/v1/resolve?label=service:web"),
                       (["prometheus", "node"], "/v1/prometheus/node")):
        out = ok("-json", *args, port=a.port)
        assert out.count("\n") == 1 and ": " not in out and ", " not in out, out
        api = a.get_json(path)
        if path.startswith("/v1/discoveries"):  # last_check may tick between the two calls
            strip = lambda ds: [{**d, "last_check": 0} for d in ds]  # noqa: E731
            assert strip(json.loads(out)) == strip(api)
        else:
            assert json.loads(out) == api
    assert json.loads(ok("--json", "discovery", port=a.port))["labels"] == \
        a.get_json("/v1/discovery")["labels"]
    assert json.loads(ok("-json=true", "health", port=a.port)).keys() == \
        a.get_json("/v1/health").keys()


def test_discovery_resolve_prometheus_and_health_in_plain_text(fleet) -> None:
    a, _b, _c = fleet
    assert ok("discovery", port=a.port) == (
        "Hostname:\n  a.example.com\nLabels:\n  prometheus:node\n"
        "  prometheus:node:dc:prg\n  service:web\n")
    assert ok("discovery", port=fleet[2].port) == "Hostname:\n  c\n"  # no labels, no heading
    assert ok("resolve", "service:smtp", port=a.port) == "mail.example.com\n"
    assert ok("resolve", "service:none", port=a.port) == ""
    assert ok("prometheus", "node", port=a.port) == "a.example.com:9100    dc=prg\n"
    health = ok("health", port=a.port)
    assert health.startswith("status:   ok\nhostname: a.example.com\n")
    assert "hosts:    3\n" in health and "NATS:     connected to nats://127.0.0.1:" in health


def test_labels_add_and_del(lobbyd, tmp_path) -> None:
    a = lobbyd("a")
    assert ok("labels", "add", "role:x", "service:y", port=a.port) == ""
    assert a.get_json("/v1/discovery")["labels"] == ["role:x", "service:y"]
    assert (tmp_path / "labels-a" / "_runtime").read_text() == "role:x\nservice:y\n"
    assert ok("labels", "del", "role:x", port=a.port) == ""
    assert a.get_json("/v1/discovery")["labels"] == ["service:y"]
    bad = ctl("labels", "add", "bad\x01label", port=a.port)
    assert bad.returncode == 1 and "answered 400" in bad.stderr and bad.stderr.count("\n") == 1
    assert a.get_json("/v1/discovery")["labels"] == ["service:y"]


def test_flags_env_and_their_precedence(lobbyd) -> None:
    a = lobbyd("a", start=False, TOKEN="t0k")
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/discovery",
                               headers={"Authorization": "Token t0k"})[0] == 200, what="API")
    wrong = str(free_port())
    expected = "Hostname:\n  a\n"
    assert ok("-host", "127.0.0.1", "-port", str(a.port), "-token", "t0k", "discovery",
              port=int(wrong)) == expected
    assert ok("--port=" + str(a.port), "--token=t0k", "-proto=http", "discovery",
              port=int(wrong)) == expected
    assert ok("discovery", port=a.port,
              env={"TOKEN": "t0k", "HOST": "127.0.0.1", "PROTOCOL": "http"}) == expected
    denied = ctl("discovery", port=a.port, env={"TOKEN": "nope"})
    assert denied.returncode == 1 and denied.stdout == ""
    assert denied.stderr == f"lobbyctl: lobbyd at http://127.0.0.1:{a.port} answered 403: " \
                            "access denied; -token (or TOKEN) is not lobbyd's TOKEN\n"


def test_exit_statuses_unreachable_and_usage(lobbyd, nats) -> None:
    port = free_port()  # nothing listens there
    down = ctl("discoveries", port=port)
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.startswith(f"lobbyctl: cannot reach lobbyd at http://127.0.0.1:{port}: ")
    assert down.stderr.count("\n") == 1
    for args in (["bogus"], [], ["labels", "add"], ["labels", "move", "x"],
                 ["discoveries", "filter", "x"], ["resolve"], ["-port", "x", "discoveries"],
                 ["-proto", "gopher", "discoveries"], ["-nope", "discoveries"],
                 ["labels", "del", "--ttl", "5", "x"], ["-port"]):
        usage = ctl(*args, port=port)
        assert usage.returncode == 2 and "usage: lobbyctl" in usage.stderr, (args, usage)
        assert usage.stdout == ""
    helped = ctl("-h", port=port)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: lobbyctl")
    nats.stop()
    a = lobbyd("a", start=False)
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/discovery")[0] == 200, what="API up")
    sick = ctl("health", port=a.port)
    assert sick.returncode == 1 and sick.stdout.startswith("status:   disconnected\n")
    assert f"NATS:     disconnected from {nats.url} for " in sick.stdout, sick.stdout
    assert json.loads(ctl("-json", "health", port=a.port).stdout)["status"] == "disconnected"


def test_labels_by_source(lobbyd, tmp_path) -> None:
    a = lobbyd("a", LABELS="service:web")
    Path(a.env["LABELS_PATH"]).mkdir(exist_ok=True)
    (Path(a.env["LABELS_PATH"]) / "role").write_text("role:mx\n")
    assert a.request("POST", "/v1/labels", body="rt:1")[0] == 200
    posted = time.monotonic()
    assert a.request("POST", "/v1/labels?ttl=600", body="leased:1")[0] == 200

    def shown(*args: str) -> str:
        """A lease's seconds left tick on while lobbyctl starts (slowly, on a busy machine):
        600 at most, and no fewer than 600 less the seconds since the POST."""
        text = ok("labels", *args, port=a.port)
        left = re.search(r"\((\d+) s left\)", text)
        assert left and 600 - (time.monotonic() - posted) <= int(left[1]) <= 600, text
        return re.sub(r"\(\d+ s left\)", "(600 s left)", text)

    lines = shown().splitlines()
    assert [line.split() for line in lines] == [
        ["env", "(LABELS)", "service:web"], ["file", "role", "role:mx"], ["runtime", "rt:1"],
        ["lease", "(600", "s", "left)", "leased:1"]], lines
    assert shown("list") == "\n".join(lines) + "\n"
    assert json.loads(ok("-json", "labels", port=a.port))["env"] == ["service:web"]


def test_version_and_the_errors_an_operator_meets(lobbyd) -> None:
    version = ok("--version", port=1)
    assert version == f"lobbyctl (lobbyd) {L.__version__}\n"
    a = lobbyd("a", wait=False, TOKEN="sekrit")
    wait_for(lambda: a.request("GET", "/v1/discovery")[0] == 403, what="a's API")
    https = ctl("-proto", "https", "discoveries", port=a.port)
    assert https.returncode == 1 and https.stderr.count("\n") == 1, https.stderr
    assert "SSL" not in https.stderr and "use -proto http" in https.stderr, https.stderr
    denied = ctl("discoveries", port=a.port)
    assert denied.returncode == 1 and denied.stderr == (
        f"lobbyctl: lobbyd at http://127.0.0.1:{a.port} answered 403: access denied; "
        "set TOKEN or -token to lobbyd's TOKEN\n")
    wrong = ctl("-token", "nope", "watch", port=a.port)
    assert wrong.returncode == 1 and "-token (or TOKEN) is not lobbyd's TOKEN" in wrong.stderr
    assert ok("-token", "sekrit", "discovery", port=a.port).startswith("Hostname:")


def lines_of(stream, into: queue.Queue) -> threading.Thread:
    """Every line of `stream` into `into`, from a thread (reads block)."""
    def pump() -> None:
        for line in stream:
            into.put(line)
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def test_watch_survives_a_restart_of_lobbyd_and_misses_no_change(lobbyd) -> None:
    a = lobbyd("a", LABELS="service:web")
    b = lobbyd("b", LABELS="service:db")
    wait_for(lambda: a.hostnames() == ["a", "b"], what="a hears b")
    env = base_env()
    env["PORT"] = str(a.port)
    watch = subprocess.Popen([*lobbyd_command(), "ctl", "-json", "watch"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: queue.Queue = queue.Queue()
    err: queue.Queue = queue.Queue()
    lines_of(watch.stdout, out)
    lines_of(watch.stderr, err)
    view: dict[str, list[str]] = {}

    def apply(line: str) -> None:
        change = json.loads(line)
        if change["event"] == "snapshot":
            view.update({p["hostname"]: p["labels"] for p in change["data"]})
        elif change["event"] == "left":
            view.pop(change["data"]["hostname"], None)
        else:
            view[change["data"]["hostname"]] = change["data"]["labels"]

    def until(expected: dict[str, list[str]], timeout: float = 15) -> None:
        end = time.monotonic() + timeout
        while view != expected:
            try:
                apply(out.get(timeout=max(0.01, end - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"watch shows {view}, not {expected}") from None

    try:
        until({"a": ["service:web"], "b": ["service:db"]})
        a.stop()
        # while a is away: b changes, c joins, b's change is all a's watchers would miss
        assert b.request("POST", "/v1/labels", body="role:primary")[0] == 200
        lobbyd("c", LABELS="service:smtp")
        a.start()
        until({"a": ["service:web"], "b": ["role:primary", "service:db"],
               "c": ["service:smtp"]})
        said: list[str] = []
        end = time.monotonic() + 5
        while not any(line.startswith("lobbyctl: reconnected") for line in said):
            try:
                said.append(err.get(timeout=max(0.01, end - time.monotonic())))
            except queue.Empty:
                break
        assert any("trying again in" in line for line in said), said
        assert any(line.startswith("lobbyctl: reconnected to lobbyd at") for line in said), said
        assert watch.poll() is None
    finally:
        watch.kill()
        watch.wait(timeout=10)


def test_unreachable_names_the_flag_for_tls_against_plain_http() -> None:
    """lobbyd answers a TLS hello by closing, or lets the handshake time out waiting for a
    request head: either way the one line says to use -proto http."""
    import ssl

    for exc in (ssl.SSLEOFError(8, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF"),
                TimeoutError("_ssl.c:989: The handshake operation timed out")):
        assert "use -proto http" in L.unreachable(exc, tls=True), exc
    assert L.unreachable(ConnectionRefusedError(111, "Connection refused"), tls=True) == \
        "Connection refused"
    assert L.unreachable(TimeoutError("timed out")) == "timed out"


def test_missed_events_pure() -> None:
    before = {"a": {"hostname": "a", "labels": ["x"]}, "gone": {"hostname": "gone", "labels": []}}
    now = [{"hostname": "a", "labels": ["y"]}, {"hostname": "new", "labels": []}]
    assert L.missed_events(before, now) == [
        ("left", {"hostname": "gone", "reason": "missed"}), ("changed", now[0]),
        ("joined", now[1])]
    assert L.missed_events({"a": {"hostname": "a", "labels": ["x"], "last_check": 1}},
                           [{"hostname": "a", "labels": ["x"], "last_check": 9}]) == []


def run_on_terminal(args: list[str], env: dict[str, str]) -> str:
    """What lobbyctl prints when its stdout is a terminal (a real pseudo-terminal)."""
    main, child = pty.openpty()
    proc = subprocess.Popen([*lobbyd_command(), "ctl", *args], env=env, stdout=child,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(child)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 20)
            if not ready:
                break
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        assert proc.wait(timeout=20) == 0
    return out.decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(fleet) -> None:
    a, _b, _c = fleet
    env = {**base_env(), "PORT": str(a.port), "TERM": "xterm"}
    coloured = run_on_terminal(["discoveries"], env)
    assert "\x1b[1m" in coloured and "\x1b[36mservice:\x1b[0mweb" in coloured
    assert "\x1b[" not in run_on_terminal(["discoveries"], {**env, "NO_COLOR": "1"})
    assert "\x1b[" not in ok("discoveries", port=a.port, env={"TERM": "xterm"})  # a pipe


def test_lobbyctl_is_a_second_name_of_the_same_program(fleet, tmp_path: Path) -> None:
    a, _b, _c = fleet
    if os.environ.get("LOBBYD_CMD"):  # the static binary, called by a second name
        link = tmp_path / "lobbyctl"
        link.symlink_to(lobbyd_command()[0])
        command = [str(link)]
    else:  # the console script pip installs next to this interpreter
        command = [str(Path(sys.executable).parent / "lobbyctl")]
    done = subprocess.run([*command, "resolve", "service:web"], capture_output=True, text=True,
                          env={**base_env(), "PORT": str(a.port)}, timeout=20)
    assert done.returncode == 0 and done.stdout == "a.example.com\n", done


def test_parse_ctl_args_pure() -> None:
    options, words = L.parse_ctl_args(["-json", "--host=::1", "discoveries", "-port", "99",
                                       "labels", "--", "-odd"], {"TOKEN": "x"})
    assert (options.json, options.host, options.port, options.token) == (True, "::1", 99, "x")
    assert options.base == "http://[::1]:99"
    assert words == ["discoveries", "labels", "-odd"]
    assert L.parse_ctl_args(["labels", "add", "--ttl", "30", "a"], {})[1] == \
        ["labels", "add", "--ttl", "30", "a"]
    with pytest.raises(L.CtlUsageError):
        L.parse_ctl_args(["-json=maybe"], {})
    assert L.format_duration(93784) == "1d 2h 3m 4s" and L.format_duration(5) == "5s"
