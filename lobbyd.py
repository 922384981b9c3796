#!/usr/bin/env python3
"""lobbyd: every server knows every other server, and what runs on it.

Every server runs one lobbyd. It publishes a small JSON *discovery packet* (its
hostname and labels such as ``service:smtp``) every KEEP_ALIVE seconds on a NATS
subject, listens to everyone else's, forgets a host that goes silent for TTL
seconds (or at once on its goodbye), and answers a local HTTP API
(``curl localhost:1313/``). Wire-compatible with Lobby, the Go daemon
(by-cx/lobby v1.4).

Run ``lobbyd --help`` for the environment variables that configure it. The file
reads top to bottom in the order data flows: errors, config, labels, wire
format, registry, queries, NATS driver, HTTP server, API routes, callback
runner, daemon lifecycle, ``main()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import gzip
import hmac
import ipaddress
import json
import logging
import os
import re
import resource
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

__version__ = "1.0.0"

log = logging.getLogger("lobbyd")


###############################################################################
# Errors: one base class; ConfigError becomes exit status 78 in main() only.
###############################################################################


class LobbydError(Exception):
    """Base of every error lobbyd raises on purpose."""


class ConfigError(LobbydError):
    """A bad environment variable: lobbyd refuses to start (EX_CONFIG)."""


class LabelError(LobbydError, ValueError):
    """A label breaks the rules (empty, control characters, too long)."""


class PacketError(LobbydError, ValueError):
    """A NATS message that is not a discovery envelope we accept."""


EX_CONFIG = 78


###############################################################################
# Config: the environment variables of SPEC section 2, parsed once, frozen.
###############################################################################

TRUE_WORDS = {"1", "t", "true", "yes", "y", "on"}
FALSE_WORDS = {"0", "f", "false", "no", "n", "off"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
SUBJECT_RE = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")


def show(value: str, limit: int = 60) -> str:
    """A value as it may appear in one log line: quoted, escaped, shortened."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


def parse_bool(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={show(value)}: expected a boolean (true/false, 1/0, yes/no, on/off)")


def parse_int(name: str, value: str, low: int, high: int) -> int:
    text = value.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,12}", text):
        raise ConfigError(f"{name}={show(value)}: expected a whole number from {low} to {high}")
    number = int(text)
    if not low <= number <= high:
        raise ConfigError(f"{name}={show(value)}: expected a whole number from {low} to {high}")
    return number


def int_in(low: int, high: int) -> Callable[[str, str], int]:
    """A parser of whole numbers from `low` to `high`, for the ENV_VARS table."""
    return lambda name, value: parse_int(name, value, low, high)


def parse_host(name: str, value: str) -> str:
    host = value.strip().strip("[]")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    # 256.1.1.1 is no IPv4 address, and must not be looked up in DNS as a name either
    if not re.fullmatch(r"[0-9.]+", host) and \
            re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        return host
    raise ConfigError(f"{name}={show(value)}: expected an IP address (e.g. 127.0.0.1, ::) "
                      "or a host name")


def parse_nats_urls(name: str, value: str) -> tuple[str, ...]:
    urls = []
    for item in value.split(","):
        url = item.strip()
        if not url:
            continue
        if "://" not in url:
            url = "nats://" + url
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{name}: bad URL {redact_url(url)!r}: {exc}") from None
        if parts.scheme not in NATS_SCHEMES or not parts.hostname or \
                (port is not None and not 0 < port < 65536):
            raise ConfigError(f"{name}: bad URL {redact_url(url)!r}: expected "
                              "nats://[user:pass@]host[:port] (or tls://, ws://, wss://)")
        urls.append(url)
    if not urls:
        raise ConfigError(f"{name}={show(value)}: expected one or more comma-separated NATS URLs")
    return tuple(urls)


def redact_url(url: str) -> str:
    """The URL without its password or token, for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc="***@" + host).geturl()


def parse_subject(name: str, value: str) -> str:
    subject = value.strip()
    if not SUBJECT_RE.fullmatch(subject) or len(subject) > 255:
        raise ConfigError(f"{name}={show(value)}: expected a NATS subject such as "
                          "lobby.discovery (no spaces or wildcards)")
    return subject


def parse_filename(name: str, value: str) -> str:
    filename = value.strip()
    if not filename or filename in (".", "..") or "/" in filename or "\0" in filename \
            or filename.startswith("."):
        raise ConfigError(f"{name}={show(value)}: expected a plain file name "
                          "(no '/', not starting with '.')")
    return filename


def parse_hostname(name: str, value: str) -> str:
    hostname = value.strip()
    if not valid_hostname(hostname):
        raise ConfigError(f"{name}={show(value)}: expected a host name of 1 to 253 bytes "
                          "without spaces or control characters")
    return hostname


def parse_command(name: str, value: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        raise ConfigError(f"{name}={show(value)}: cannot split into words: {exc}") from None


def parse_env_labels(name: str, value: str) -> tuple[str, ...]:
    labels = []
    for item in value.split(","):
        if not item.strip():
            continue
        try:
            labels.append(validate_label(item))
        except LabelError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return tuple(labels)


def parse_log_level(name: str, value: str) -> str:
    level = value.strip().upper()
    if level == "WARN":
        level = "WARNING"
    if level not in LOG_LEVELS:
        raise ConfigError(f"{name}={show(value)}: expected one of {', '.join(LOG_LEVELS)}")
    return level


DRIVER_NAMES = {"NATS": "NATS", "REDIS": "Redis"}


def parse_driver(name: str, value: str) -> tuple[str, ...]:
    """NATS, Redis, or both comma-separated (the registry is their union)."""
    drivers: list[str] = []
    for item in value.split(","):
        word = item.strip().upper()
        if not word:
            continue
        if word not in DRIVER_NAMES:
            raise ConfigError(f"{name}={show(value)}: expected NATS, Redis or NATS,Redis")
        if DRIVER_NAMES[word] not in drivers:
            drivers.append(DRIVER_NAMES[word])
    if not drivers:
        raise ConfigError(f"{name}={show(value)}: expected NATS, Redis or NATS,Redis")
    return tuple(drivers)


def parse_channel(name: str, value: str) -> str:
    channel = value.strip()
    if not channel or len(channel) > 255 or CONTROL_RE.search(channel) or " " in channel:
        raise ConfigError(f"{name}={show(value)}: expected a Redis channel name such as "
                          "lobby:discovery (no spaces)")
    return channel


#: name -> (default, parser, help). The one table behind Config and --help.
ENV_VARS: dict[str, tuple[str, Callable[[str, str], Any], str]] = {
    "TOKEN": ("", lambda n, v: v.strip(), "API token; empty = no authentication"),
    "HOST": ("127.0.0.1", parse_host, "address the HTTP API listens on (IPv4 or IPv6, e.g. ::)"),
    "PORT": ("1313", int_in(1, 65535), "HTTP API port"),
    "DISABLE_API": ("false", parse_bool, "no HTTP listener at all"),
    "DRIVER": ("NATS", parse_driver, "discovery transport: NATS, Redis, or NATS,Redis"),
    "NATS_URL": ("nats://127.0.0.1:4222", parse_nats_urls,
                 "NATS URL or comma-separated cluster URLs (nats://, tls://, user:pass@)"),
    "NATS_DISCOVERY_CHANNEL": ("lobby.discovery", parse_subject, "NATS subject"),
    "REDIS_HOST": ("127.0.0.1", parse_host, "Redis server (DRIVER=Redis)"),
    "REDIS_PORT": ("6379", int_in(1, 65535), "Redis port"),
    "REDIS_DB": ("0", int_in(0, 65535), "Redis database number"),
    "REDIS_CHANNEL": ("lobby:discovery", parse_channel, "Redis pub/sub channel"),
    "REDIS_PASSWORD": ("", lambda n, v: v, "Redis password (never logged)"),
    "LABELS": ("", parse_env_labels, "comma-separated labels of this server"),
    "LABELS_PATH": ("/etc/lobby/labels", lambda n, v: v.strip(),
                    "directory of label files, one label per line"),
    "RUNTIME_LABELS_FILENAME": ("_runtime", parse_filename,
                                "file in LABELS_PATH holding labels added through the API"),
    "HOSTNAME": ("", lambda n, v: parse_hostname(n, v) if v.strip() else "",
                 "overrides the machine's hostname"),
    "CLEAN_EVERY": ("15", int_in(1, 86400), "at most this many seconds between clean-ups"),
    "KEEP_ALIVE": ("5", int_in(1, 86400), "seconds between keep-alive packets"),
    "TTL": ("30", int_in(1, 864000), "seconds after which a silent host is dead"),
    "NODE_EXPORTER_PORT": ("9100", int_in(1, 65535), "default port of Prometheus targets"),
    "REGISTER": ("true", parse_bool, "false = client only: listen, never publish"),
    "CALLBACK": ("", parse_command, "command run (no shell) when the registry changes"),
    "CALLBACK_COOLDOWN": ("15", int_in(0, 86400),
                          "min seconds from the end of one callback run to the next start"),
    "CALLBACK_FIRST_RUN_DELAY": ("30", int_in(0, 86400),
                                 "no callback run before this many seconds after start"),
    "CALLBACK_TIMEOUT": ("60", int_in(1, 86400),
                         "a callback run still going after this many seconds is killed"),
    "LOG_LEVEL": ("INFO", parse_log_level, "DEBUG, INFO, WARNING or ERROR"),
}


@dataclass(frozen=True)
class Config:
    """lobbyd's whole configuration; build it with Config.from_env()."""

    token: str = ""
    host: str = "127.0.0.1"
    port: int = 1313
    disable_api: bool = False
    driver: tuple[str, ...] = ("NATS",)
    nats_url: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    nats_discovery_channel: str = "lobby.discovery"
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    redis_channel: str = "lobby:discovery"
    redis_password: str = field(default="", repr=False)
    labels: tuple[str, ...] = ()
    labels_path: str = "/etc/lobby/labels"
    runtime_labels_filename: str = "_runtime"
    hostname: str = ""
    clean_every: int = 15
    keep_alive: int = 5
    ttl: int = 30
    node_exporter_port: int = 9100
    register: bool = True
    callback: tuple[str, ...] = ()
    callback_cooldown: int = 15
    callback_first_run_delay: int = 30
    callback_timeout: int = 60
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Parse every variable of ENV_VARS; an empty value means the default."""
        values = {}
        for name, (default, parser, _help) in ENV_VARS.items():
            raw = environ.get(name, "")
            if _has_surrogates(raw):  # TOKEN and NATS_URL may hold secrets: never shown
                shown = "" if name in ("TOKEN", "NATS_URL") else f"={show(raw)}"
                raise ConfigError(f"{name}{shown}: not valid UTF-8")
            values[name.lower()] = parser(name, raw if raw.strip() else default)
        return cls(**values)

    @property
    def runtime_labels_file(self) -> Path:
        return Path(self.labels_path) / self.runtime_labels_filename


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def help_text() -> str:
    lines = [
        f"lobbyd {__version__}: server discovery over NATS, wire-compatible with Lobby.",
        "",
        "usage: lobbyd [--help] [--version]",
        "",
        "Configured only by environment variables (an empty value means the default):",
        "",
    ]
    for name, (default, _parser, text) in ENV_VARS.items():
        shown = default if default else "(empty)"
        if name == "HOSTNAME":
            shown = "(the machine's hostname)"
        lines.append(f"  {name:<26} {text}")
        lines.append(f"  {'':<26} default: {shown}")
    lines += [
        "",
        "TLS: tls:// URLs verify the server against SSL_CERT_FILE / SSL_CERT_DIR, else",
        "the system CA bundle.",
        "",
        "Signals: SIGTERM or SIGINT say goodbye on NATS and exit 0 (a second one is",
        "harmless); SIGHUP re-reads the label files now.",
        "Exit status: 0 stopped by a signal, 78 bad configuration (one line on stderr",
        "names the variable), 2 bad command-line arguments, 1 cannot start (e.g. the",
        "port is in use).",
        "",
        "API (curl localhost:1313/...; the README lists every route):",
        "  GET /, /v1/discoveries[?labels=a,b|?prefixes=p]   every live server",
        "  GET /v1/discovery         this server's packet",
        "  GET /v1/resolve?label=X   hostnames having label X",
        "  GET /v1/prometheus/NAME   Prometheus HTTP SD target groups of job NAME",
        "  POST, DELETE /v1/labels   add, remove runtime labels (body: one per line)",
        "  GET /v1/health            200 while connected, 503 otherwise (JSON)",
        "  GET /metrics              Prometheus metrics of lobbyd itself",
        "",
        "Client: lobbyctl ... or lobbyd ctl ... (lobbyctl --help).",
    ]
    return "\n".join(lines)


###############################################################################
# Labels: validation, and the three sources — env, label files, runtime file.
###############################################################################

MAX_LABEL_BYTES = 1024
MAX_LABELS = 1000
MAX_LABEL_FILE_BYTES = 1 << 20
# C0 and C1 controls, and the Unicode line and paragraph separators: anything
# str.splitlines() would break a line at must never be inside a label.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def validate_label(raw: str) -> str:
    """The label trimmed of white space, or LabelError saying what is wrong."""
    label = raw.strip()
    if not label:
        raise LabelError("empty label")
    if CONTROL_RE.search(label):
        raise LabelError(f"label {show(label)} contains a control character")
    if len(label) * 4 > MAX_LABEL_BYTES:
        try:
            size = len(label.encode("utf-8"))
        except UnicodeEncodeError:
            raise LabelError(f"label {show(label)} is not valid UTF-8") from None
        if size > MAX_LABEL_BYTES:
            raise LabelError(f"label {show(label)} is {size} bytes, over {MAX_LABEL_BYTES}")
    elif _has_surrogates(label):
        raise LabelError(f"label {show(label)} is not valid UTF-8")
    return label


def parse_label_lines(text: str) -> tuple[list[str], list[str]]:
    """Labels of a label file (blank lines and # comments skipped) and the problems found."""
    labels, problems = [], []
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            labels.append(validate_label(stripped))
        except LabelError as exc:
            problems.append(f"line {number}: {exc}")
    return labels, problems


def parse_request_labels(body: str) -> list[str]:
    """Labels of a POST/DELETE body, one per line; LabelError on the first bad one."""
    labels = []
    for line in body.split("\n"):
        if not line.strip():
            continue
        labels.append(validate_label(line))
    return labels


def read_label_file(path: Path) -> tuple[list[str], list[str]]:
    """(labels, problems) of one file. OSError when it cannot be read right now."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_LABEL_FILE_BYTES + 1)
    if len(data) > MAX_LABEL_FILE_BYTES:
        return [], [f"larger than {MAX_LABEL_FILE_BYTES} bytes, skipped"]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], ["not valid UTF-8, skipped"]
    return parse_label_lines(text)


@dataclass
class LabelScan:
    """What one pass over LABELS_PATH found."""

    labels: dict[str, list[str]] = field(default_factory=dict)  # path -> its labels
    problems: dict[str, list[str]] = field(default_factory=dict)  # path -> what is wrong
    unreadable: set[str] = field(default_factory=set)  # I/O errors now: keep their old labels
    complete: bool = True  # False: the directory itself could not be listed


def scan_label_dir(directory: Path) -> LabelScan:
    """Every regular, non-hidden file directly in `directory`; never raises."""
    scan = LabelScan()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return scan  # a missing directory means "no file labels"
    except OSError as exc:
        scan.problems[str(directory)] = [f"cannot list: {exc.strerror or exc}"]
        scan.complete = False
        return scan
    for entry in entries:
        if entry.name.startswith("."):
            continue  # editor swap files, our own temp files
        try:
            if not entry.is_file():
                continue
            found, trouble = read_label_file(Path(entry.path))
        except OSError as exc:
            scan.problems[entry.path] = [f"cannot read: {exc.strerror or exc}"]
            scan.unreadable.add(entry.path)
            continue
        scan.labels[entry.path] = found
        if trouble:
            scan.problems[entry.path] = trouble
    return scan


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: temp file in the same directory, fsync, rename, fsync dir.

    A crash at any point leaves either the old or the new file, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = text.encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RuntimeLabels:
    """Labels added through the API, kept in LABELS_PATH/RUNTIME_LABELS_FILENAME."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[str]:
        """The runtime labels; OSError if the file exists but cannot be read (then
        nothing may be written either, or the labels it holds would be lost)."""
        try:
            labels, _problems = read_label_file(self.path)
        except FileNotFoundError:
            return []
        return labels

    def remove_stale_temp_files(self) -> None:
        """Temp files of writes that a crash (kill -9, power loss) cut short."""
        pattern = re.compile(re.escape(f".{self.path.name}.") + r"[0-9]+\.tmp")
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path.parent):
                if pattern.fullmatch(entry.name):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        log.info("removed %s, left by an interrupted write", entry.path)

    def save(self, labels: Sequence[str]) -> None:
        """Replace the file's labels; OSError (and the old file kept) if it cannot."""
        # one label per line and nothing else: a Go lobbyd reading the same
        # directory would publish a comment line as a label
        write_atomically(self.path, "".join(label + "\n" for label in labels))


def changed_labels(current: Sequence[str], add: Iterable[str], remove: Iterable[str]
                   ) -> list[str]:
    """The runtime labels after an API call: sorted, de-duplicated."""
    return sorted(set(current).union(add).difference(remove))


class LocalLabels:
    """The union of env labels and label files.

    A file that cannot be read for the moment (EMFILE, EIO) keeps the labels it
    had, and each problem is logged once, not on every re-read.
    """

    def __init__(self, env_labels: Sequence[str], directory: Path):
        self.env_labels = tuple(env_labels)
        self.directory = directory
        self._by_file: dict[str, list[str]] = {}
        self._reported: dict[str, list[str]] = {}

    def collect(self) -> tuple[str, ...]:
        """Re-read every label file."""
        scan = scan_label_dir(self.directory)
        self.report(scan.problems)
        if scan.complete:
            by_file = scan.labels
            for path in scan.unreadable & self._by_file.keys():
                by_file[path] = self._by_file[path]
            self._by_file = by_file
        return self.union()

    def with_file(self, path: Path, labels: list[str]) -> tuple[str, ...]:
        """The labels once `path` holds `labels`, without reading anything."""
        self._by_file[str(path)] = labels
        return self.union()

    def union(self) -> tuple[str, ...]:
        labels = sorted(set(self.env_labels).union(*self._by_file.values()))
        if len(labels) > MAX_LABELS:
            log.error("%d labels, over the limit of %d: publishing the first %d",
                      len(labels), MAX_LABELS, MAX_LABELS)
            labels = labels[:MAX_LABELS]
        return tuple(labels)

    def report(self, problems: dict[str, list[str]]) -> None:
        for path, trouble in problems.items():
            if self._reported.get(path) != trouble:
                for line in trouble:
                    log.warning("label file %s: %s", path, line)
        self._reported = problems


###############################################################################
# Wire format: the discovery packet and the NATS envelope around it.
###############################################################################

MAX_HOSTNAME_BYTES = 253
HOSTNAME_RE = re.compile(r"[^\x00-\x20\x7f]+")


def valid_hostname(hostname: str) -> bool:
    if not hostname or len(hostname) > MAX_HOSTNAME_BYTES or not HOSTNAME_RE.fullmatch(hostname):
        return False
    if hostname.isascii():
        return True
    try:
        return len(hostname.encode("utf-8")) <= MAX_HOSTNAME_BYTES
    except UnicodeEncodeError:
        return False


class Packet(NamedTuple):
    """What one host says about itself.

    Immutable like a frozen dataclass, but a NamedTuple: the API builds one per
    host per answer, and a tuple is several times cheaper to create.
    """

    hostname: str
    labels: tuple[str, ...] = ()
    last_check: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "labels": list(self.labels),
                "last_check": self.last_check}


def encode_envelope(packet: Packet, message: str = "hi") -> bytes:
    """The envelope the Go daemon sends: {"discovery": {...}, "message": "hi"}."""
    return json.dumps({"discovery": packet.to_json(), "message": message},
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class BoundedCache(dict):  # type: ignore[type-arg]
    """A dict that forgets everything once it holds `entries` items or `cost` units.

    Forgetting all at once is crude but O(1) per insert, and hostile traffic can
    never grow it: each cache of LabelCache stays within a few dozen MB.
    """

    def __init__(self, entries: int, cost: int):
        super().__init__()
        self.max_entries, self.max_cost, self.cost = entries, cost, 0

    def put(self, key: Any, value: Any, cost: int) -> None:
        if len(self) >= self.max_entries or self.cost + cost > self.max_cost:
            self.clear()
            self.cost = 0
        self[key] = value
        self.cost += cost


class LabelCache:
    """Validated hostnames, labels and label lists, each stored once.

    Hosts share most labels, and a keep-alive repeats the last one: keyed by
    what was received, a known packet costs dict lookups instead of checks.
    """

    def __init__(self, entries: int = 200_000, chars: int = 16_000_000):
        self.lists = BoundedCache(entries, chars)  # cost: characters (+1 per label)
        self.strings = BoundedCache(entries, chars)
        self.hostnames = BoundedCache(entries, chars)

    def hostname(self, raw: Any) -> str:
        """The hostname, validated once and stored once; PacketError if invalid."""
        known = self.hostnames.get(raw) if type(raw) is str else None
        if known is not None:
            return known
        if type(raw) is not str or not valid_hostname(raw):
            raise PacketError("missing, empty or invalid hostname")
        self.hostnames.put(raw, raw, len(raw))
        return raw

    def normalise(self, raw: tuple[str, ...]) -> tuple[str, ...]:
        """The label list validated, trimmed, sorted, de-duplicated; PacketError if bad."""
        known = self.lists.get(raw)
        if known is not None:
            return known
        if len(raw) > MAX_LABELS:
            raise PacketError(f"{len(raw)} labels, over {MAX_LABELS}")
        strings = self.strings
        labels = [strings.get(label) for label in raw]  # labels seen before need no checks
        if None in labels:
            # A list with a label never seen is likely seen once (a counter, garbage):
            # it is cached when it comes again, with every label known by then.
            return tuple(sorted({self.label(label) if known is None else known
                                 for known, label in zip(labels, raw)}))
        result = tuple(sorted(set(labels)))
        # A list that arrived normalised (as every lobbyd sends it) is its own key:
        # the cache then holds no second copy of its strings.
        self.lists.put(result if raw == result else raw, result, sum(map(len, raw)) + len(raw))
        return result

    def label(self, raw: Any) -> str:
        if type(raw) is not str:
            raise PacketError("labels must be strings")
        known = self.strings.get(raw)
        if known is None:
            try:
                known = validate_label(raw)
            except LabelError as exc:
                raise PacketError(str(exc)) from None
            self.strings.put(raw, known, len(raw))
        return known


_scan_json = json.JSONDecoder().scan_once


def parse_json(data: bytes) -> Any:
    """json.loads for the hot path: one C call when the payload has no leading space."""
    try:
        text = data.decode("utf-8")
        try:
            value, end = _scan_json(text, 0)
        except StopIteration:
            return json.loads(text)  # leading white space, or an error to describe
        if end != len(text) and text[end:].strip():
            raise ValueError("extra data after the JSON value")
        return value
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PacketError(f"not JSON: {str(exc)[:80]}") from None


def decode_envelope(data: bytes, cache: LabelCache) -> tuple[str, str, tuple[str, ...]]:
    """(message, hostname, labels) of a NATS payload, or PacketError.

    This runs for every packet of the fleet, so it checks types with `type() is`
    and leaves label validation to the cache.
    """
    envelope = parse_json(data)
    if type(envelope) is not dict:
        raise PacketError("not a JSON object")
    message = envelope.get("message")
    if message != "hi" and message != "goodbye":
        raise PacketError(f"unknown message {show(str(message), 30)}")
    discovery = envelope.get("discovery")
    if type(discovery) is not dict:
        raise PacketError("no discovery object")
    hostname = cache.hostname(discovery.get("hostname"))
    labels = discovery.get("labels")
    if labels is None or message == "goodbye":
        return message, hostname, ()
    if type(labels) is not list:
        raise PacketError("labels is not a list")
    try:
        return message, hostname, cache.normalise(tuple(labels))
    except TypeError:  # unhashable items: lists or objects among the labels
        raise PacketError("labels must be strings") from None


###############################################################################
# Registry: hostname -> (labels, when we last heard it), with expiry.
###############################################################################


NEW_HOST, NEW_LABELS = 2, 1


class Registry:
    """Every live host. `version` changes whenever membership or labels change.

    Times are this daemon's clock when it received the packet: senders' clocks
    drift, and the sender's last_check is ignored.
    """

    def __init__(self, ttl: float):
        self.ttl = ttl
        # hostname -> (labels, received): tuples of strings and floats, which the
        # garbage collector stops tracking, so its full rounds skip the registry
        self.hosts: dict[str, tuple[tuple[str, ...], float]] = {}
        self.version = 0
        self._oldest = float("inf")  # a lower bound of every `received`
        self._order: list[str] | None = None  # sorted hostnames, until membership changes

    def __len__(self) -> int:
        return len(self.hosts)

    def apply_hi(self, hostname: str, labels: tuple[str, ...], now: float) -> int:
        """Record a keep-alive: NEW_HOST, NEW_LABELS, or 0 (false) for no change."""
        entry = self.hosts.get(hostname)
        if now < self._oldest:
            self._oldest = now
        if entry is None:
            self.hosts[hostname] = (labels, now)
            self.version += 1
            self._order = None
            return NEW_HOST
        if entry[0] != labels:
            self.hosts[hostname] = (labels, now)
            self.version += 1
            return NEW_LABELS
        self.hosts[hostname] = (entry[0], now)
        return 0

    def learn(self, hostname: str, labels: tuple[str, ...], received: float) -> bool:
        """A host heard second-hand (a peer's sync answer): added only if unknown."""
        if hostname in self.hosts:
            return False
        self.hosts[hostname] = (labels, received)
        self._oldest = min(self._oldest, received)
        self.version += 1
        self._order = None
        return True

    def apply_goodbye(self, hostname: str) -> bool:
        if self.hosts.pop(hostname, None) is None:
            return False
        self.version += 1
        self._order = None
        return True

    def expire(self, now: float) -> list[str]:
        """Drop hosts silent for more than TTL; cheap when nothing can have expired."""
        if now - self._oldest <= self.ttl:
            return []
        deadline = now - self.ttl
        dead = [name for name, entry in self.hosts.items() if entry[1] < deadline]
        for name in dead:
            del self.hosts[name]
        self._oldest = min((entry[1] for entry in self.hosts.values()), default=float("inf"))
        if dead:
            self.version += 1
            self._order = None
        return dead

    def next_expiry(self) -> float:
        """The earliest moment a host can expire (inf when the registry is empty)."""
        return self._oldest + self.ttl

    def order(self) -> list[str]:
        """Every hostname, sorted (kept until membership changes). Call expire() first."""
        if self._order is None:
            self._order = sorted(self.hosts)
        return self._order

    def packets(self) -> list[Packet]:
        """Every host as a packet, sorted by hostname. Call expire() first."""
        self.order()
        hosts = self.hosts
        return [Packet(name, hosts[name][0], int(hosts[name][1])) for name in self._order]


###############################################################################
# Queries: pure functions from packets to answers (filters, resolve, Prometheus).
###############################################################################

PROM_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
PORT_RE = re.compile(r"[0-9]{1,5}")


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def filter_by_labels(packets: Iterable[Packet], wanted: Sequence[str]) -> list[Packet]:
    """Hosts having any of `wanted`; their labels reduced to the matching ones."""
    wanted_set = set(wanted)
    out = []
    for packet in packets:
        matching = tuple(label for label in packet.labels if label in wanted_set)
        if matching:
            out.append(Packet(packet.hostname, matching, packet.last_check))
    return out


def filter_by_prefixes(packets: Iterable[Packet], prefixes: Sequence[str]) -> list[Packet]:
    """Hosts having a label starting with any of `prefixes`; labels reduced likewise."""
    starts = tuple(prefixes)
    out = []
    for packet in packets:
        matching = tuple(label for label in packet.labels if label.startswith(starts))
        if matching:
            out.append(Packet(packet.hostname, matching, packet.last_check))
    return out


def select_packets(packets: list[Packet], labels: Sequence[str], prefixes: Sequence[str]
                   ) -> list[Packet]:
    """GET /v1/discoveries: `labels` wins over `prefixes`; neither means everything."""
    if labels:
        return filter_by_labels(packets, labels)
    if prefixes:
        return filter_by_prefixes(packets, prefixes)
    return packets


def resolve_label(packets: Iterable[Packet], label: str) -> list[str]:
    return [packet.hostname for packet in packets if label in packet.labels]


def with_port(host: str, port: str | None) -> str:
    """host:port for a Prometheus target; a host that carries a port is kept as it is."""
    if host.startswith("["):
        if "]:" in host or port is None:
            return host
        return f"{host}:{port}"
    if host.count(":") == 1:
        return host  # already host:port
    if ":" in host:
        host = f"[{host}]"  # a bare IPv6 address
    return host if port is None else f"{host}:{port}"


def prometheus_group(name: str, packet: Packet, default_port: int) -> dict[str, Any] | None:
    """The target group of one host for job NAME, or None if it has no such labels."""
    base, prefix = f"prometheus:{name}", f"prometheus:{name}:"
    found = False
    hosts: list[str] = []
    port: str | None = str(default_port)
    labels: dict[str, str] = {}
    for label in packet.labels:
        if label == base:
            found = True
            continue
        if not label.startswith(prefix):
            continue
        key, sep, value = label[len(prefix):].partition(":")
        if not sep:
            continue
        found = True
        if key == "host":
            if value and value not in hosts:
                hosts.append(value)
        elif key == "port":
            if value == "-":
                port = None
            elif PORT_RE.fullmatch(value) and 0 < int(value) < 65536:
                port = value
        elif PROM_LABEL_RE.fullmatch(key):
            labels[key] = value
    if not found:
        return None
    targets = [with_port(host, port) for host in (hosts or [packet.hostname])]
    return {"Targets": targets, "Labels": dict(sorted(labels.items()))}


def prometheus_groups(name: str, packets: Iterable[Packet], default_port: int
                      ) -> list[dict[str, Any]]:
    """Prometheus HTTP SD target groups for job NAME, one per host that has any."""
    groups = (prometheus_group(name, packet, default_port) for packet in packets)
    return [group for group in groups if group is not None]


def render_json(value: Any) -> bytes:
    """Pretty JSON like the Go daemon's (2-space indent, trailing newline)."""
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


#: a str as a JSON string, like json.dumps(s, ensure_ascii=False) without its overhead
json_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]


def packet_block(packet: Packet, label_blocks: dict[tuple[str, ...], str]) -> bytes:
    """One packet as it stands in a pretty-printed list; label lists memoised."""
    labels = label_blocks.get(packet.labels)
    if labels is None:
        items = ",\n".join(f"      {json_string(label)}" for label in packet.labels)
        labels = label_blocks[packet.labels] = f"[\n{items}\n    ]" if items else "[]"
    return (f'  {{\n    "hostname": {json_string(packet.hostname)},\n'
            f'    "labels": {labels},\n    "last_check": {packet.last_check}\n  }}').encode()


def group_block(group: dict[str, Any] | None) -> bytes | None:
    """One Prometheus target group as it stands in a pretty-printed list."""
    if group is None:
        return None
    targets = ",\n".join(f"      {json_string(target)}" for target in group["Targets"])
    labels = ",\n".join(f"      {json_string(key)}: {json_string(value)}"
                        for key, value in group["Labels"].items())
    labels_json = f"{{\n{labels}\n    }}" if labels else "{}"
    return (f'  {{\n    "Targets": [\n{targets}\n    ],\n    "Labels": {labels_json}\n  }}'
            ).encode()


class BlockRenderer:
    """A pretty-printed JSON list with one block per host, rendered fast.

    json's indenting encoder is pure Python, and a big registry changes little
    from one second to the next: each host's block is kept until `key(packet)`
    changes. Equal to render_json() of the same list, byte for byte.
    """

    def __init__(self, block: Callable[[Packet], bytes | None],
                 key: Callable[[Packet], Any] = lambda packet: packet):
        self.block = block
        self.key = key
        self.blocks: dict[str, tuple[Any, bytes | None]] = {}

    def render(self, packets: Sequence[Packet]) -> bytes:
        old, new = self.blocks, {}
        parts = []
        for packet in packets:
            key = self.key(packet)
            cached = old.get(packet.hostname)
            block = cached[1] if cached is not None and cached[0] == key else self.block(packet)
            new[packet.hostname] = (key, block)
            if block is not None:
                parts.append(block)
        self.blocks = new
        return b"[\n" + b",\n".join(parts) + b"\n]\n" if parts else b"[]\n"


class RegistryRenderer:
    """The whole registry as GET /v1/discoveries lists it, equal to BlockRenderer's.

    The hot answer (every host, re-rendered each second for last_check): each host's
    block up to its last_check is kept while its labels stay, so a render is a join.
    """

    def __init__(self, label_blocks: dict[tuple[str, ...], str]):
        self.label_blocks = label_blocks
        self.heads: dict[str, tuple[tuple[str, ...], bytes]] = {}  # host -> (labels, head)

    def render(self, registry: Registry) -> bytes:
        order, hosts = registry.order(), registry.hosts
        if not order:
            return b"[]\n"
        heads = self.heads
        if len(heads) > len(order) + len(order) // 2 + 64:
            heads = self.heads = {}  # forget the hosts that went
        if len(self.label_blocks) > 2 * len(order) + 1024:
            self.label_blocks.clear()  # and label lists no host carries any more
        parts = []
        for name in order:
            labels, received = hosts[name]
            head = heads.get(name)
            if head is None or head[0] != labels:
                block = packet_block(Packet(name, labels, 0), self.label_blocks)
                head = heads[name] = (labels, block[:-len(b"0\n  }")])
            parts.append(head[1])
            parts.append(b"%d\n  },\n" % received)
        parts[-1] = parts[-1][:-2] + b"\n]\n"
        return b"[\n" + b"".join(parts)


###############################################################################
# Transports: the seam between the daemon and the fleet. A small base class, one
# subclass per kind (NATS, Redis), and the DRIVER table that picks them; the daemon
# holds a list of transports and never asks which kind it holds.
###############################################################################


class Transport:
    """One way to reach the fleet: connect for ever (with backoff), publish the
    discovery envelopes, hand every one received to the daemon, answer and ask a
    join sync where the transport can, close, and a state for /v1/health."""

    kind = ""

    def __init__(self, config: Config, environ: Mapping[str, str], name: str,
                 on_connect: Callable[[Transport], Awaitable[None]],
                 on_state: Callable[[], None]):
        self.config = config
        self.environ = environ
        self.name = name
        self.on_connect = on_connect  # after every (re)connection, once subscribed
        self.on_state = on_state  # told of every connect, loss and reconnect
        self.connected = asyncio.Event()
        self.since = time.time()  # of the last change between connected and not
        self.reconnects = 0  # reconnections after the first connection
        self.was_connected = False
        self._closing = False

    # what every transport provides ------------------------------------------
    @property
    def is_connected(self) -> bool:
        raise NotImplementedError

    @property
    def server(self) -> str | None:
        """scheme://host:port of the server in use, never with credentials; None if none."""
        raise NotImplementedError

    def targets(self) -> str:
        """Where it connects to, for logs and systemd's STATUS (no credentials)."""
        raise NotImplementedError

    async def run(self, handle: Callable[[bytes], None]) -> None:
        """Connect for ever; every discovery payload received goes to `handle`."""
        raise NotImplementedError

    async def publish(self, data: bytes) -> bool:
        """Publish a discovery envelope if connected; False if it could not be sent."""
        raise NotImplementedError

    async def close(self, timeout: float = 1.0) -> None:
        """Flush what was published, then close; bounded so shutdown stays quick."""
        raise NotImplementedError

    # join sync: a transport that cannot do it learns the fleet from keep-alives
    async def ask_fleet(self, reply: Callable[[bytes], bool], window: float) -> bool:
        """Ask one peer for its registry; each answer chunk goes to `reply`, which says
        whether it was the last. True if a complete answer came within `window`."""
        return False

    async def serve_fleet(self, answer: Callable[[int], list[bytes]]) -> None:
        """Answer peers' join requests with `answer(max chunk size)`."""

    async def said_goodbye(self) -> None:
        """The daemon has published its goodbye: forget what the transport stored."""

    # shared ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """This transport's part of GET /v1/health."""
        return {"driver": self.kind, "connected": self.is_connected, "server": self.server,
                "since": int(self.since), "reconnects": self.reconnects}

    def _changed(self, connected: bool) -> None:
        if connected != self.connected.is_set():
            self.since = time.time()
        if connected:
            self.was_connected = True
            self.connected.set()
        else:
            self.connected.clear()
        self.on_state()


###############################################################################
# The NATS transport: nats-py, reconnecting for ever; join sync by request/reply.
###############################################################################

CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, Fedora, CentOS
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+
    "/etc/ssl/cert.pem",  # Alpine, macOS
)


def tls_context(environ: Mapping[str, str]) -> Any:
    """A verifying TLS context that also works in a static binary built elsewhere.

    A frozen OpenSSL only looks at the build host's CA directory, so when no
    SSL_CERT_FILE/SSL_CERT_DIR is set and it finds no CA, try the usual bundles.
    """
    import ssl

    context = ssl.create_default_context()
    cafile, capath = environ.get("SSL_CERT_FILE"), environ.get("SSL_CERT_DIR")
    if cafile or capath:
        context.load_verify_locations(cafile=cafile or None, capath=capath or None)
        return context
    if context.cert_store_stats().get("x509_ca", 0) == 0:
        for bundle in CA_BUNDLES:
            if os.path.isfile(bundle):
                context.load_verify_locations(cafile=bundle)
                break
    return context


class NatsDriver(Transport):
    """The NATS connection: never blocks start-up, retries for ever, logs state changes once."""

    kind = "NATS"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.urls = list(self.config.nats_url)
        self.subject = self.config.nats_discovery_channel
        self.sync_subject = self.subject + ".sync"
        self.nc: Any = None
        self._warned = False  # the current outage has been logged
        self._sync_serving = False

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def server(self) -> str | None:
        """nats://host:port of the server in use, never with credentials; None if none."""
        url = self.nc.connected_url if self.is_connected else None
        if url is None or not url.hostname:
            return None
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return f"{url.scheme}://{host}:{url.port or 4222}"

    def targets(self) -> str:
        return ", ".join(redact_url(url) for url in self.urls)

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload if self.is_connected else 1 << 20

    async def run(self, handle: Callable[[bytes], None]) -> None:
        """Connect with backoff until it works, then let nats-py reconnect for ever.

        Every payload on the subject goes to `handle`, a plain function: it runs in
        the connection's read loop, as the wire parser meets each message.
        """
        import nats  # imported late: the API must answer before this costs anything

        delay = 0.1
        while not self._closing:
            try:
                self.nc = direct_client(nats)()
                await self.nc.connect(
                    servers=self.urls, name=self.name, allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2,
                    ping_interval=4, max_outstanding_pings=2, **self._tls_options(),
                    error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected, closed_cb=self._on_closed)
            except Exception as exc:  # nats-py raises many types here; all mean "try later"
                await self._on_error(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            break
        if self._closing:
            return
        log.info("connected to NATS at %s", redact_url(self._current_url()))
        self._warned = False

        async def slow_path(msg: Any) -> None:  # messages with headers, or old nats-py
            handle(msg.data)

        sub = await self.nc.subscribe(self.subject, cb=slow_path, pending_msgs_limit=200_000,
                                      pending_bytes_limit=256 * 1024 * 1024)
        if hasattr(self.nc, "direct") and isinstance(getattr(sub, "_id", None), int):
            self.nc.direct[sub._id] = handle
        self._changed(True)
        await self.on_connect(self)

    def _tls_options(self) -> dict[str, Any]:
        # a CA store costs ~2 MB of memory: load it only for tls:// and wss:// URLs
        if any(url.startswith(("tls://", "wss://")) for url in self.urls):
            return {"tls": tls_context(self.environ)}
        return {}

    def _current_url(self) -> str:
        url = self.nc.connected_url if self.nc else None
        return url.geturl() if url else "?"

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports every failed attempt; an operator needs the first one only
        if not self.connected.is_set() and not self._warned:
            self._warned = True
            log.warning("NATS unreachable at %s (%s); retrying, the API keeps serving",
                        self.targets(), describe_error(exc))
        else:
            log.debug("NATS: %s", describe_error(exc))

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self._changed(False)
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", redact_url(self._current_url()))
        self._warned = False
        self.reconnects += 1
        self._changed(True)
        await self.on_connect(self)

    async def _on_closed(self) -> None:
        if not self._closing:
            log.error("NATS connection closed")

    async def publish(self, data: bytes) -> bool:
        return await self.publish_to(self.subject, data)

    async def publish_to(self, subject: str, data: bytes, reply: str = "") -> bool:
        """Publish if connected; while disconnected there is nothing to buffer for."""
        if not self.is_connected:
            return False
        try:
            await self.nc.publish(subject, data, reply=reply)
            return True
        except Exception as exc:  # a connection lost mid-publish: the reconnect will resend
            log.debug("publish on %s failed: %s", subject, describe_error(exc))
            return False

    # join: learn every live host from one peer instead of waiting a keep-alive round
    async def ask_fleet(self, reply: Callable[[bytes], bool], window: float) -> bool:
        """One request on SUBJECT.sync; NATS hands it to one peer of the queue group."""
        replies: asyncio.Queue[bytes | None] = asyncio.Queue()
        complete, sub = False, None

        async def on_reply(msg: Any) -> None:
            replies.put_nowait(msg.data)

        timer = asyncio.get_running_loop().call_later(window, replies.put_nowait, None)
        try:
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox, cb=on_reply)
            await self.publish_to(self.sync_subject, b"{}", reply=inbox)
            while not complete:
                data = await replies.get()
                if data is None:
                    log.debug("sync: no complete answer within %gs", window)
                    break
                if not data:  # "no responders": nobody answers joins yet, we are the first
                    break
                complete = reply(data)
        except Exception as exc:  # the connection went away: the next connect syncs again
            log.debug("sync failed: %s", describe_error(exc))
        finally:
            timer.cancel()
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        return complete

    async def serve_fleet(self, answer: Callable[[int], list[bytes]]) -> None:
        if self._sync_serving or not self.is_connected:
            return
        self._sync_serving = True  # nats-py keeps the subscription across reconnects

        async def on_request(msg: Any) -> None:
            if msg.reply:
                for chunk in answer(max(4096, self.max_payload // 2)):
                    await self.publish_to(msg.reply, chunk)

        await self.nc.subscribe(self.sync_subject, queue=SYNC_QUEUE, cb=on_request)

    async def close(self, timeout: float = 1.0) -> None:
        self._closing = True
        if self.nc is None or self.nc.is_closed:
            return
        try:
            if self.nc.is_connected:
                await asyncio.wait_for(self.nc.flush(timeout=1), timeout)
        except Exception as exc:
            log.debug("flush at shutdown: %s", describe_error(exc))
        try:
            await asyncio.wait_for(self.nc.close(), timeout)
        except Exception as exc:
            log.debug("close at shutdown: %s", describe_error(exc))


def direct_client(nats: Any) -> Any:
    """nats-py's Client, handing the messages of chosen subscriptions to a function.

    nats-py builds a Msg, parses headers and goes through a queue and a task for
    every message; at fleet scale that is most of the cost of a packet. For a
    subscription in `direct`, a plain message skips all of it. If this nats-py
    has no such hook, the subscription's callback does the same job, slower.
    """
    base = nats.aio.client.Client
    if not hasattr(base, "_process_msg"):
        return base

    class DirectClient(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.direct: dict[int, Callable[[bytes], None]] = {}

        @property  # type: ignore[override]
        def _transport(self) -> Any:
            return self.__dict__.get("_batching_transport")

        @_transport.setter
        def _transport(self, transport: Any) -> None:
            self.__dict__["_batching_transport"] = \
                None if transport is None else BatchingReads(transport, self)

        async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                               headers: bytes) -> None:
            handle = self.direct.get(sid)
            if handle is None or headers or reply:
                await super()._process_msg(sid, subject, reply, data, headers)
            else:
                try:
                    handle(data)
                except Exception as exc:  # never let one packet break the connection
                    log.error("handling a packet failed: %s", describe_error(exc))

    return DirectClient


#: after a read that found little, reading from NATS rests this long (seconds)
INGEST_BATCH_S = 0.010
#: a read of less than this many bytes found little ...
INGEST_SMALL_READ = 4096
#: ... and when it came this soon (seconds) after the one before, packets trickle in
INGEST_TRICKLE_GAP = 0.001


class BatchingReads:
    """nats-py's transport, reading a trickle of packets in batches.

    A fleet at steady state sends a packet every few hundred microseconds, and
    waking up for each one (epoll, recv, a task step, the parser) costs far more
    than the packet. After a read that found little, reading pauses for
    INGEST_BATCH_S while the kernel collects what comes. Only a trickle pauses
    (a small read less than INGEST_TRICKLE_GAP after the one before): a packet
    after a silence, or a label change a few milliseconds after the last, is
    read at once; a busy stream (big reads) never pauses, nor does a client
    waiting for a PONG (a flush: connecting, reconnecting).
    """

    def __init__(self, inner: Any, client: Any):
        self._inner = inner
        self._client = client
        self._small = False
        self._last = 0.0  # when the last read returned (monotonic)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        self._small = False  # a new connection's first answers are read at once
        return await self._inner.connect(*args, **kwargs)

    async def connect_tls(self, *args: Any, **kwargs: Any) -> Any:
        self._small = False
        return await self._inner.connect_tls(*args, **kwargs)

    async def read(self, buffer_size: int) -> bytes:
        if self._small and not getattr(self._client, "_pongs", None):  # no PONG awaited
            writer = getattr(self._inner, "_io_writer", None)
            transport = getattr(writer, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.pause_reading()
                try:
                    await asyncio.sleep(INGEST_BATCH_S)
                finally:
                    if not transport.is_closing():
                        transport.resume_reading()
        data: bytes = await self._inner.read(buffer_size)
        now = time.monotonic()
        self._small = len(data) < INGEST_SMALL_READ and now - self._last < INGEST_TRICKLE_GAP
        self._last = now
        return data


def describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return re.sub(r"://[^@/\s]*@", "://***@", text)[:300]


###############################################################################
# The Redis transport: pub/sub on REDIS_CHANNEL, like the Go daemon's Redis driver.
# redis-py is imported only when DRIVER names Redis.
###############################################################################

REDIS_PING_EVERY = 4.0  # an application-level ping: a stopped server still ACKs TCP
REDIS_SILENT_AFTER = 12.0
REDIS_SYNC_CHUNK = 256 * 1024
REDIS_RETRY_MAX = 1.0


class RedisDriver(Transport):
    """Redis pub/sub: one connection listens (and pings), one publishes; both are
    made again, with backoff, whenever either fails. Join sync is request/reply over
    pub/sub, answered by the one peer that claims the request first (SET NX)."""

    kind = "Redis"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        config = self.config
        self.channel = config.redis_channel.encode()
        self.sync_channel = self.channel + b".sync"
        self.client: Any = None
        self.pubsub: Any = None
        self._up = False
        self._warned = False
        self._answer: Callable[[int], list[bytes]] | None = None
        self._replies: dict[bytes, asyncio.Queue[bytes | None]] = {}  # reply channel -> queue

    @property
    def is_connected(self) -> bool:
        return self._up

    @property
    def server(self) -> str | None:
        return self.targets() if self._up else None

    def targets(self) -> str:
        host = self.config.redis_host
        host = f"[{host}]" if ":" in host else host
        return f"redis://{host}:{self.config.redis_port}/{self.config.redis_db}"

    async def run(self, handle: Callable[[bytes], None]) -> None:
        """Connect, subscribe and listen until the connection fails; then again, for ever."""
        import redis.asyncio as aioredis  # only here: a NATS-only lobbyd never imports it
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        delay = 0.1
        while not self._closing:
            config = self.config
            # no silent retries inside redis-py: a lost connection must show (health,
            # logs, a fresh hi and join), and this loop reconnects
            self.client = aioredis.Redis(
                host=config.redis_host, port=config.redis_port, db=config.redis_db,
                password=config.redis_password or None, socket_connect_timeout=2,
                socket_timeout=5, client_name=self.name.replace(" ", "-"),
                retry=Retry(NoBackoff(), 0))
            self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self.pubsub.subscribe(self.channel)
                await self._connected()
                delay = 0.1
                await self._listen(handle)
            except Exception as exc:  # redis-py raises many types here; all mean "try later"
                self._lost(exc)
            finally:
                await self._disconnect()
            if not self._closing:
                await asyncio.sleep(delay)
                # a refused connection costs nothing: try every second, so a returning
                # Redis lists us again well within KEEP_ALIVE + 1 s
                delay = min(delay * 2, REDIS_RETRY_MAX)

    async def _connected(self) -> None:
        if self.was_connected:
            self.reconnects += 1
            log.info("reconnected to Redis at %s", self.targets())
        else:
            log.info("connected to Redis at %s", self.targets())
        self._up, self._warned = True, False
        self._changed(True)
        await self.on_connect(self)

    def _lost(self, exc: Exception) -> None:
        if self._closing:
            return
        if self._up:
            self._up = False
            self._changed(False)
            log.warning("disconnected from Redis (%s); reconnecting", describe_error(exc))
        elif not self._warned:
            self._warned = True
            log.warning("Redis unreachable at %s (%s); retrying, the API keeps serving",
                        self.targets(), describe_error(exc))
        else:
            log.debug("Redis: %s", describe_error(exc))

    async def _listen(self, handle: Callable[[bytes], None]) -> None:
        """Hand every message to its consumer; ping, and give up on a silent server."""
        pubsub = self.pubsub
        last_heard = next_ping = time.monotonic()
        while not self._closing:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is not None:
                last_heard = now
                if message["type"] == "message":
                    self._dispatch(message["channel"], message["data"], handle)
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + REDIS_PING_EVERY
            if now - last_heard > REDIS_SILENT_AFTER:
                raise ConnectionError(f"no answer for {REDIS_SILENT_AFTER:g}s")

    def _dispatch(self, channel: bytes, data: bytes, handle: Callable[[bytes], None]) -> None:
        if channel == self.channel:
            try:
                handle(data)
            except Exception as exc:  # never let one packet break the connection
                log.error("handling a packet failed: %s", describe_error(exc))
        elif channel == self.sync_channel:
            self.schedule_answer(data)
        elif channel in self._replies:
            self._replies[channel].put_nowait(data)

    async def _disconnect(self) -> None:
        for closing in (self.pubsub, self.client):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closing.aclose(), 1.0)

    async def publish(self, data: bytes) -> bool:
        return await self._publish(self.channel, data)

    async def _publish(self, channel: bytes, data: bytes) -> bool:
        if not self._up:
            return False
        try:
            await self.client.publish(channel, data)
            return True
        except Exception as exc:  # the listener notices the lost connection too
            log.debug("publish on Redis failed: %s", describe_error(exc))
            return False

    # join sync -------------------------------------------------------------------
    async def ask_fleet(self, reply: Callable[[bytes], bool], window: float) -> bool:
        request_id = os.urandom(8).hex()
        reply_channel = self.sync_channel + b"." + request_id.encode()
        replies: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._replies[reply_channel] = replies
        timer = asyncio.get_running_loop().call_later(window, replies.put_nowait, None)
        complete = False
        try:
            await self.pubsub.subscribe(reply_channel)
            request = json.dumps({"id": request_id, "reply": reply_channel.decode()})
            listeners = await self.client.publish(self.sync_channel, request)
            while listeners and not complete:  # 0: nobody answers joins yet, we are the first
                data = await replies.get()
                if data is None:
                    log.debug("sync over Redis: no complete answer within %gs", window)
                    break
                complete = reply(data)
        except Exception as exc:  # the connection went away: the next connect syncs again
            log.debug("sync over Redis failed: %s", describe_error(exc))
        finally:
            timer.cancel()
            del self._replies[reply_channel]
            with contextlib.suppress(Exception):
                await self.pubsub.unsubscribe(reply_channel)
        return complete

    async def serve_fleet(self, answer: Callable[[int], list[bytes]]) -> None:
        self._answer = answer
        if self._up:
            await self.pubsub.subscribe(self.sync_channel)

    def schedule_answer(self, request: bytes) -> None:
        task = asyncio.ensure_future(self._answer_join(request))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _answer_join(self, request: bytes) -> None:
        """Answer a join if this daemon is the first to claim it (like a NATS queue group)."""
        try:
            asked = json.loads(request)
            request_id, reply_channel = str(asked["id"]), str(asked["reply"])
        except (ValueError, TypeError, KeyError):
            return
        if self._answer is None or reply_channel.encode() in self._replies:
            return  # not serving yet, or our own request
        claimed = await self.client.set(self.sync_channel + b":" + request_id.encode(), b"1",
                                        nx=True, ex=60)
        if claimed:
            for chunk in self._answer(REDIS_SYNC_CHUNK):
                await self._publish(reply_channel.encode(), chunk)

    async def close(self, timeout: float = 1.0) -> None:
        self._closing = True
        self._up = False
        await asyncio.wait_for(self._disconnect(), timeout)


#: DRIVER names -> transport classes
TRANSPORTS: dict[str, type[Transport]] = {"NATS": NatsDriver, "Redis": RedisDriver}


###############################################################################
# HTTP server: HTTP/1.1 on asyncio streams, with limits on everything.
###############################################################################

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 20
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
BODY_TIMEOUT = 60.0
WRITE_TIMEOUT = 60.0
WRITE_SLICE = 1 << 20
SENDFILE_MIN = 64 * 1024  #: answers this big are sent from a MemoryFile
KNOWN_HEADS = 256  #: request heads whose parse is remembered ...
KNOWN_HEAD_BYTES = 2048  #: ... when they are no longer than this
MAX_CONNECTIONS = 1000
LISTEN_BACKLOG = 128
TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
REASONS = {200: "OK", 100: "Continue", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required", 413: "Content Too Large", 431:
           "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable",
           505: "HTTP Version Not Supported", 507: "Insufficient Storage"}
JSON_TYPE = "application/json; charset=UTF-8"
GZIP_HEADERS = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
TEXT_TYPE = "text/plain; charset=UTF-8"


class HttpError(LobbydError):
    """Ends a request with a status and a plain-text message.

    Raised while reading a request, it also ends the connection: what follows
    in the stream cannot be trusted to start a request.
    """

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    version: str
    headers: dict[str, str]
    body: bytes = b""

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


class MemoryFile:
    """A big cached answer in an anonymous memory file, its keep-alive head in front.

    The kernel then sends it (sendfile) from its own pages to the socket: Python
    never copies its bytes again, however many clients ask. The file never
    changes once written, and closes when the last request sending it lets go.
    """

    __slots__ = ("file", "head", "headers", "length")

    def __init__(self, head: bytes, body: bytes, headers: Mapping[str, str]):
        fd = os.memfd_create("lobbyd-answer", os.MFD_CLOEXEC)
        self.file = open(fd, "rb", buffering=0)  # noqa: SIM115 - lives as long as the answer
        view = memoryview(head + body)
        while view:
            view = view[os.write(fd, view):]
        self.head = head
        self.headers = dict(headers)  # the extra headers `head` carries
        self.length = len(body)

    def __del__(self) -> None:
        self.file.close()


def memory_file(head: bytes, body: bytes, headers: Mapping[str, str]) -> MemoryFile | None:
    """The answer in a MemoryFile, or None where the system has none (it is then sent
    from memory, as small answers are)."""
    if len(body) < SENDFILE_MIN or not hasattr(os, "memfd_create"):
        return None
    try:
        return MemoryFile(head, body, headers)
    except OSError:
        return None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    file: MemoryFile | None = None  #: when set, the body is in there (and `body` empty)

    @classmethod
    def cached(cls, body: bytes, headers: dict[str, str] | None = None) -> Response:
        """A JSON answer served many times: big ones go into a MemoryFile."""
        headers = headers or {}
        file = memory_file(response_head(200, JSON_TYPE, len(body), True, headers), body,
                           headers)
        return cls(200, b"" if file else body, JSON_TYPE, headers, file)

    def copy(self) -> Response:
        """This response with headers of its own (a handler may add some)."""
        return Response(self.status, self.body, self.content_type, dict(self.headers),
                        self.file)

    @property
    def length(self) -> int:
        return self.file.length if self.file else len(self.body)

    @classmethod
    def text(cls, status: int, message: str, headers: Mapping[str, str] | None = None
             ) -> Response:
        return cls(status, (message.rstrip("\n") + "\n").encode("utf-8"), TEXT_TYPE,
                   dict(headers or {}))


def parse_request_head(head: bytes) -> Request:
    """Request line and headers (without the blank line), or HttpError(400/505)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes anything; kept for clarity
        raise HttpError(400, "bad request encoding") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not TOKEN_RE.fullmatch(parts[0].encode("latin-1")) or \
            not parts[1] or CONTROL_RE.search(parts[1]):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if re.fullmatch(r"HTTP/[0-9]\.[0-9]", version):
            raise HttpError(505, f"unsupported protocol {version}")
        raise HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not TOKEN_RE.fullmatch(name.encode("latin-1")) or "\n" in value \
                or "\r" in value:
            raise HttpError(400, "malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key in ("content-length", "host", "authorization"):
                if headers[key] != value:
                    raise HttpError(400, f"conflicting {name} headers")
                continue
            headers[key] += ", " + value
        else:
            headers[key] = value
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif re.match(r"https?://", target):
        rest = urlsplit(target)
        path, query = rest.path or "/", rest.query
    elif target == "*":
        path, query = "*", ""
    else:
        raise HttpError(400, "malformed request target")
    return Request(method, unquote(path), parse_qs(query, keep_blank_values=True), version,
                   headers)


def body_length(request: Request) -> int | None:
    """Content-Length of the body; None for chunked; HttpError for anything else off."""
    encoding = request.headers.get("transfer-encoding")
    if encoding is not None:
        if encoding.strip().lower() != "chunked":
            raise HttpError(501, f"unsupported Transfer-Encoding {show(encoding)}")
        if "content-length" in request.headers:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        return None
    raw = request.headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise HttpError(400, f"bad Content-Length {show(raw)}")
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise HttpError(413, f"body over {MAX_BODY_BYTES} bytes")
    return length


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9a-fA-F]{1,8}", size_text):
            raise HttpError(400, "bad chunk size")
        size = int(size_text, 16)
        if len(body) + size > MAX_BODY_BYTES:
            raise HttpError(413, f"body over {MAX_BODY_BYTES} bytes")
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers: ignored
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "bad chunk terminator")


def wants_keep_alive(request: Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def response_head(status: int, content_type: str, length: int, keep_alive: bool,
                  headers: Mapping[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             f"Content-Type: {content_type}", f"Content-Length: {length}",
             "Connection: keep-alive" if keep_alive else "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def listen_problem(host: str, port: int) -> str | None:
    """Why HOST:PORT can never be listened on, or None if trying again may work.

    asyncio's error does not always carry an errno (3.13 folds them into one
    message), so a plain socket asks the kernel once more.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"HOST={show(host)}: cannot listen there: {exc.strerror}"
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EACCES:
                    return f"PORT={port}: not allowed to listen there: {exc.strerror}"
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
                    return f"HOST={show(host)}: cannot listen there: {exc.strerror}"
    return None  # e.g. the port is in use: it may be free on the next try


def connection_limit() -> int:
    """MAX_CONNECTIONS, kept well below the file-descriptor limit (raised to the hard one).

    asyncio accepts up to LISTEN_BACKLOG sockets in one go before we can close the
    ones over the limit, and NATS, label files and callbacks need some too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 65536:
        hard = 65536
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(1, min(MAX_CONNECTIONS, soft - LISTEN_BACKLOG - 64))


class HttpServer:
    """Accepts connections and hands each parsed Request to `handle`."""

    def __init__(self, handle: Callable[[Request], Awaitable[Response]]):
        self.handle = handle
        self.limit = connection_limit()
        self.active = 0
        self.codes: dict[int, int] = {}  # status -> responses sent, for /metrics
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self._heads: dict[bytes, Request] = {}  # request head -> its parse

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port,
                                                 limit=MAX_HEADER_BYTES, backlog=LISTEN_BACKLOG)

    async def close(self) -> None:
        if self.server:
            self.server.close()
        for writer in list(self.writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.limit:
            writer.close()  # over the limit: close at once, costing the others nothing
            return
        self.active += 1
        self.writers.add(writer)
        try:
            first = True
            while await self._serve_one(reader, writer, first):
                first = False
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, OSError):
            pass  # the client went away, stalled, or sent what cannot be answered
        finally:
            self.active -= 1
            self.writers.discard(writer)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         first: bool) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            request = await self._read_request(reader, writer, first)
        except HttpError as exc:
            await self._write(writer, Response.text(exc.status, exc.message, exc.headers),
                              False, head_only=False)
            return False
        response = await self.handle(request)
        # after a 500 the connection's state is suspect; a 503 (unhealthy) is an answer
        keep_alive = wants_keep_alive(request) and (response.status < 500 or
                                                    response.status == 503)
        await self._write(writer, response, keep_alive, head_only=request.method == "HEAD")
        return keep_alive

    def _parse(self, head: bytes) -> Request:
        """parse_request_head(), remembered: a poller (Prometheus, a load balancer, wrk)
        sends the very same head every time."""
        known = self._heads.get(head)
        if known is None:
            known = parse_request_head(head)  # HttpError: not remembered
            if len(head) <= KNOWN_HEAD_BYTES:
                if len(self._heads) >= KNOWN_HEADS:
                    self._heads.clear()
                self._heads[head] = known
        return Request(known.method, known.path, known.query, known.version, known.headers)

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            first: bool) -> Request:
        # A new connection must send all its headers within HEADER_TIMEOUT; a kept-
        # alive one may idle for IDLE_TIMEOUT, then has HEADER_TIMEOUT for the rest.
        started = b""
        if not first:
            with deadline(writer, IDLE_TIMEOUT):
                started = await reader.readexactly(1)
        with deadline(writer, HEADER_TIMEOUT):
            try:
                head = started + await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise HttpError(431, f"request headers over {MAX_HEADER_BYTES} bytes") from None
        request = self._parse(head[:-4].lstrip(b"\r\n"))
        length = body_length(request)
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        with deadline(writer, BODY_TIMEOUT):
            if length is None:
                request.body = await read_chunked(reader)
            elif length:
                request.body = await reader.readexactly(length)
        return request

    async def _write(self, writer: asyncio.StreamWriter, response: Response, keep_alive: bool,
                     head_only: bool) -> None:
        self.codes[response.status] = self.codes.get(response.status, 0) + 1
        if response.file is not None and not head_only:
            await self._send_file(writer, response, keep_alive)
            return
        writer.write(response_head(response.status, response.content_type, response.length,
                                   keep_alive, response.headers))
        body = memoryview(b"" if head_only else response.body)
        with deadline(writer, WRITE_TIMEOUT):
            # In slices: a slow reader then holds one slice in its buffer, not a
            # copy of a multi-megabyte answer (a thousand of those are gigabytes).
            for start in range(0, len(body), WRITE_SLICE):
                writer.write(body[start:start + WRITE_SLICE])
                await writer.drain()
            if not body:
                await writer.drain()

    async def _send_file(self, writer: asyncio.StreamWriter, response: Response,
                         keep_alive: bool) -> None:
        """Head and body in one sendfile from the MemoryFile (its head says keep-alive)."""
        file = response.file
        assert file is not None
        offset, count = 0, len(file.head) + file.length
        if not keep_alive or response.headers != file.headers or response.status != 200 \
                or response.content_type != JSON_TYPE:  # the file's head does not fit
            writer.write(response_head(response.status, response.content_type, file.length,
                                       keep_alive, response.headers))
            offset, count = len(file.head), file.length
        transport = writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None and not transport.get_write_buffer_size():
            # Most answers fit the socket's buffer: one system call, no future.
            with contextlib.suppress(BlockingIOError, InterruptedError):
                sent = os.sendfile(sock.fileno(), file.file.fileno(), offset, count)
                offset, count = offset + sent, count - sent
            if not count:
                return
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        expired = []

        def expire() -> None:  # cancelling (not aborting) lets sendfile unregister its fd
            expired.append(True)
            if task is not None:
                task.cancel()
        timer = loop.call_later(WRITE_TIMEOUT, expire)
        try:
            await loop.sendfile(writer.transport, file.file, offset, count)
        except asyncio.CancelledError:
            if not expired:
                raise
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            writer.transport.abort()
            raise asyncio.TimeoutError from None
        finally:
            timer.cancel()


@contextlib.contextmanager
def deadline(writer: asyncio.StreamWriter, seconds: float) -> Iterator[None]:
    """Abort the connection when the block takes longer than `seconds`.

    One timer instead of asyncio.wait_for(), which costs a task per await: the
    aborted transport ends the pending read or drain with an error.
    """
    timer = asyncio.get_running_loop().call_later(seconds, writer.transport.abort)
    try:
        yield
    finally:
        timer.cancel()


###############################################################################
# Health and metrics: counters bumped where things happen, one pure renderer.
###############################################################################

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Counters:
    """What happened since start; plain attributes, bumped on the paths that exist anyway."""

    __slots__ = ("dropped", "goodbyes", "his", "joined", "left_expired", "left_goodbye",
                 "published")

    def __init__(self) -> None:
        self.his = self.goodbyes = self.dropped = self.published = 0
        self.joined = self.left_goodbye = self.left_expired = 0


class Family(NamedTuple):
    """One metric family of the exposition: name, type, help and its samples."""

    name: str
    kind: str  # counter or gauge
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]]


def metric_value(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(families: Iterable[Family]) -> bytes:
    """The Prometheus text exposition format 0.0.4 of `families`."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            shown = ",".join(f'{key}="{label_value(text)}"' for key, text in labels.items())
            lines.append(f"{family.name}{{{shown}}} {metric_value(value)}" if shown
                         else f"{family.name} {metric_value(value)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def process_families() -> list[Family]:
    """The standard process_* metrics, read from /proc (Linux only, like lobbyd)."""
    families = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
        families += [
            Family("process_cpu_seconds_total", "counter", "User and system CPU time spent.",
                   [({}, (int(stat[11]) + int(stat[12])) / ticks)]),
            Family("process_resident_memory_bytes", "gauge", "Resident memory size.",
                   [({}, rss)]),
            Family("process_virtual_memory_bytes", "gauge", "Virtual memory size.",
                   [({}, int(stat[20]))]),
            Family("process_start_time_seconds", "gauge",
                   "Start time of the process since the epoch.",
                   [({}, boot + int(stat[19]) / ticks)]),
        ]
    with contextlib.suppress(OSError):
        families.append(Family("process_open_fds", "gauge", "Open file descriptors.",
                               [({}, len(os.listdir("/proc/self/fd")))]))
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    families.append(Family("process_max_fds", "gauge", "Limit of open file descriptors.",
                           [({}, soft)]))
    return families


###############################################################################
# API routes: a table of (path -> method -> handler); handlers are short and pure.
###############################################################################


def accepts_gzip(request: Request) -> bool:
    for item in request.headers.get("accept-encoding", "").split(","):
        token, _, params = item.strip().partition(";")
        if token.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


#: under churn an answer is served for this many times the time it took to build
STALE_FACTOR = 3
#: ... and never longer than this (seconds)
MAX_STALE = 0.05


class CachedAnswer:
    """The latest answer of one view (plain, and gzipped once asked for)."""

    __slots__ = ("_gzipped", "built", "length", "plain", "stamp", "started")

    def __init__(self, stamp: tuple[int, int], body: bytes, started: float):
        self.stamp = stamp
        self.plain = Response.cached(body)
        self.length = len(body)
        self._gzipped: Response | None = None
        self.started = started
        self.built = time.monotonic()

    def reusable(self) -> bool:
        """Out of date but young: rebuilding now would make building the daemon's main work."""
        age = time.monotonic() - self.built
        return age < MAX_STALE and age < STALE_FACTOR * (self.built - self.started)

    def gzipped(self) -> Response:
        if self._gzipped is None:
            started = time.monotonic()
            file = self.plain.file
            body = os.pread(file.file.fileno(), file.length, len(file.head)) if file \
                else self.plain.body
            self._gzipped = Response.cached(gzip.compress(body, 5, mtime=0), dict(GZIP_HEADERS))
            self.started -= time.monotonic() - started  # its cost counts as building
        return self._gzipped


class Api:
    """Answers requests from the daemon's state; bodies are cached per registry version."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.routes: dict[str, dict[str, Callable[[Request], Any]]] = {
            "/": {"GET": self.discoveries},
            "/v1/discoveries": {"GET": self.discoveries},
            "/v1/discovery": {"GET": self.discovery},
            "/v1/resolve": {"GET": self.resolve},
            "/v1/labels": {"POST": self.add_labels, "DELETE": self.delete_labels},
            "/v1/health": {"GET": self.health},
            "/metrics": {"GET": self.metrics},
        }
        self.prefix_routes = {"/v1/prometheus/": {"GET": self.prometheus}}
        self.token = daemon.config.token.encode("utf-8", "surrogateescape")
        self._answers: dict[tuple[Any, ...], CachedAnswer] = {}  # view -> its latest answer
        self._renderers: dict[tuple[str, ...], BlockRenderer] = {}
        self._label_blocks: dict[tuple[str, ...], str] = {}
        self._all = RegistryRenderer({})

    # dispatch ----------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        try:
            self.authorize(request)
            handler = self.route(request)
            response = handler(request)
            if asyncio.iscoroutine(response):  # the label routes wait for the disk
                response = await response
        except HttpError as exc:
            return Response.text(exc.status, exc.message, exc.headers)
        except Exception:  # a bug must cost one request, never the daemon
            log.exception("error answering %s %s", request.method, request.path)
            return Response.text(500, "internal error; see the lobbyd log")
        return response

    def authorize(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        # headers were decoded as latin-1: encoding back gives the bytes that were sent
        ok = hmac.compare_digest(given.strip().encode("latin-1"), self.token)
        if not ok or scheme.lower() not in ("token", "bearer"):
            raise HttpError(403, "access denied")

    def route(self, request: Request) -> Callable[[Request], Any]:
        methods = self.routes.get(request.path)
        if methods is None:
            for prefix, candidate in self.prefix_routes.items():
                if request.path.startswith(prefix) and len(request.path) > len(prefix):
                    methods = candidate
                    break
        if methods is None:
            raise HttpError(404, f"no such path: {show(request.path)}")
        method = "GET" if request.method == "HEAD" else request.method
        handler = methods.get(method)
        if handler is None:
            allowed = sorted(methods) + (["HEAD"] if "GET" in methods else [])
            raise HttpError(405, f"method {show(request.method)} not allowed here",
                            {"Allow": ", ".join(allowed)})
        return handler

    # caching -----------------------------------------------------------------
    def cached(self, request: Request, key: tuple[Any, ...], build: Callable[[], bytes],
               timed: bool = True) -> Response:
        """A JSON answer built at most once per registry version (and second, if `timed`).

        An answer showing last_check can change only when the registry does or
        the second ticks over (its resolution); one without it (Prometheus,
        resolve) only when the registry does. Only the latest answer of each view
        is kept. Under label churn (a new version between any two requests) an
        answer showing last_check (already up to a second old by design) is
        reused for STALE_FACTOR times as long as it took to build, at most
        MAX_STALE: rebuilding then takes at most a quarter of the daemon's time.
        """
        self.daemon.expire()
        stamp = (self.daemon.registry.version, int(time.time()) if timed else 0)
        answer = self._answers.get(key)
        if answer is None or (answer.stamp != stamp and not (timed and answer.reusable())):
            if answer is None and len(self._answers) > 64:
                self._answers.clear()
            started = time.monotonic()
            body = build()
            answer = self._answers[key] = CachedAnswer(stamp, body, started)
        if answer.length < 1024 or not accepts_gzip(request):
            return answer.plain.copy()
        return answer.gzipped().copy()

    # handlers ----------------------------------------------------------------
    def discoveries(self, request: Request) -> Response:
        labels = split_list(request.param("labels") or "")
        prefixes = split_list(request.param("prefixes") or "")
        view = ("labels", *labels) if labels else ("prefixes", *prefixes) if prefixes \
            else ("all",)
        if view == ("all",):
            return self.cached(request, view, lambda: self._all.render(self.daemon.registry))
        return self.cached(request, view, lambda: self.renderer(view).render(
            select_packets(self.daemon.registry.packets(), labels, prefixes)))

    def renderer(self, view: tuple[str, ...]) -> BlockRenderer:
        """The block cache of one view: discoveries (all, by labels, by prefixes), a job."""
        found = self._renderers.get(view)
        if found is None:
            if len(self._renderers) > 32:
                self._renderers.clear()
                self._label_blocks.clear()
            if view[0] == "prometheus":
                name, port = view[1], self.daemon.config.node_exporter_port
                found = BlockRenderer(
                    lambda packet: group_block(prometheus_group(name, packet, port)),
                    key=lambda packet: packet.labels)
            else:
                found = BlockRenderer(lambda packet: packet_block(packet, self._label_blocks))
            self._renderers[view] = found
        return found

    def discovery(self, request: Request) -> Response:
        self.daemon.reread_labels()  # never older than the files (SPEC 3)
        return Response(200, render_json(self.daemon.local_packet().to_json()))

    def health(self, request: Request) -> Response:
        healthy, body = self.daemon.health()
        return Response(200 if healthy else 503, render_json(body))

    def metrics(self, request: Request) -> Response:
        return Response(200, render_metrics(self.daemon.metric_families()), METRICS_TYPE)

    def resolve(self, request: Request) -> Response:
        label = request.param("label")
        if not label:
            raise HttpError(400, "missing query parameter: label")
        registry = self.daemon.registry  # resolve_label() without a Packet per host
        return self.cached(request, ("resolve", label), lambda: render_json(
            [name for name in registry.order() if label in registry.hosts[name][0]]),
            timed=False)

    def prometheus(self, request: Request) -> Response:
        view = ("prometheus", request.path[len("/v1/prometheus/"):])
        return self.cached(request, view, lambda: self.renderer(view).render(
            self.daemon.registry.packets()), timed=False)

    async def add_labels(self, request: Request) -> Response:
        labels = self.request_labels(request)
        if len(set(self.daemon.labels).union(labels)) > MAX_LABELS:
            raise HttpError(400, f"a host may carry at most {MAX_LABELS} labels")
        return await self.change_labels(labels, ())

    async def delete_labels(self, request: Request) -> Response:
        return await self.change_labels((), self.request_labels(request))

    def request_labels(self, request: Request) -> list[str]:
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "request body is not valid UTF-8") from None
        try:
            labels = parse_request_labels(text)
        except LabelError as exc:
            raise HttpError(400, f"invalid label: {exc}; nothing was changed") from None
        return labels  # none at all is a no-op, as the Go client's AddLabels([]) expects

    async def change_labels(self, add: Sequence[str], remove: Sequence[str]) -> Response:
        try:
            await self.daemon.change_runtime_labels(add, remove)
        except OSError as exc:
            status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            path = self.daemon.runtime.path
            log.error("cannot save runtime labels to %s: %s", path, exc.strerror or exc)
            raise HttpError(status, f"cannot save runtime labels to {path}: "
                            f"{exc.strerror or exc}; nothing was changed") from None
        return Response(200, b"OK", TEXT_TYPE)


###############################################################################
# Callback runner: the CALLBACK command, fed the registry, never two at once.
###############################################################################

CALLBACK_OUTPUT_KEPT = 2048


class CallbackRunner:
    """Runs CALLBACK on registry changes, with first-run delay, cooldown and coalescing."""

    def __init__(self, argv: Sequence[str], cooldown: float, first_run_delay: float,
                 timeout: float, body: Callable[[], bytes]):
        self.argv = list(argv)
        self.cooldown = cooldown
        self.first_run_delay = first_run_delay
        self.timeout = timeout
        self.body = body
        self.dirty: asyncio.Event | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.timed_out = False
        self.stopping = False
        self.runs: dict[str, int] = {}  # result (ok, failed, timeout, error) -> runs
        self._last_failure = ""

    def notify(self) -> None:
        if self.dirty is not None:
            self.dirty.set()

    async def run(self) -> None:
        self.dirty = asyncio.Event()
        await asyncio.sleep(self.first_run_delay)
        self.dirty.set()  # the first run gives the script the initial state
        while not self.stopping:
            await self.dirty.wait()
            self.dirty.clear()
            if not self.stopping:
                await self.run_once()
                await asyncio.sleep(self.cooldown)

    async def run_once(self) -> None:
        name = show(self.argv[0])
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            self.count("error")
            self.failed(f"callback {name} cannot start: {exc.strerror or exc}")
            return
        self.proc, self.timed_out = proc, False
        timer = asyncio.get_running_loop().call_later(self.timeout, self._time_out, proc)
        feeding = asyncio.ensure_future(self._feed(proc, self.body()))
        reading = asyncio.ensure_future(self._read_output(proc))
        try:
            code = await proc.wait()
            # a grandchild may hold the output pipe open: its output is not waited for
            await asyncio.wait([reading], timeout=1.0)
        finally:
            timer.cancel()
            feeding.cancel()
            reading.cancel()
            self.proc = None
        output = reading.result() if reading.done() and not reading.cancelled() else ""
        self.count("timeout" if self.timed_out else "ok" if code == 0 else "failed")
        if self.timed_out:
            self.failed(f"callback {name} still running after {self.timeout:g}s: killed")
        elif code == 0:
            self._last_failure = ""
            log.info("callback %s exited 0%s", name, output and f"; output: {output}")
        else:
            self.failed(f"callback {name} exited {code}" + (output and f"; output: {output}"))

    def count(self, result: str) -> None:
        self.runs[result] = self.runs.get(result, 0) + 1

    def _time_out(self, proc: asyncio.subprocess.Process) -> None:
        self.timed_out = True
        kill_group(proc.pid)

    def stop(self) -> None:
        """No more runs; a running script is killed with its process group."""
        self.stopping = True
        if self.proc is not None and self.proc.returncode is None:
            kill_group(self.proc.pid)

    def failed(self, message: str) -> None:
        """Log a failure; the same failure again is logged at debug level only."""
        level = logging.DEBUG if message == self._last_failure else logging.WARNING
        self._last_failure = message
        log.log(level, "%s", message)

    @staticmethod
    async def _feed(proc: asyncio.subprocess.Process, body: bytes) -> None:
        try:
            assert proc.stdin is not None
            proc.stdin.write(body)
            await proc.stdin.drain()
            proc.stdin.close()
        except (ConnectionError, OSError):
            pass  # the script did not read its stdin: its business

    @staticmethod
    async def _read_output(proc: asyncio.subprocess.Process) -> str:
        """The first bytes of the script's output; the rest is read and dropped."""
        kept = bytearray()
        assert proc.stdout is not None
        while True:
            chunk = await proc.stdout.read(65536)
            if not chunk:
                break
            if len(kept) < CALLBACK_OUTPUT_KEPT:
                kept += chunk[:CALLBACK_OUTPUT_KEPT - len(kept)]
        text = kept.decode("utf-8", "replace").strip()
        return " | ".join(line for line in text.splitlines() if line.strip())


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


###############################################################################
# Daemon lifecycle: wires everything, owns the tasks, signals, readiness.
###############################################################################

SYNC_QUEUE = "lobbyd"
SYNC_WINDOW = 2.0
SHUTDOWN_DEADLINE = 3.0
READY_TIMEOUT = 5.0


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set or `timeout` passes.

    Not asyncio.wait_for(): on Python 3.9-3.11 it can swallow a cancellation
    that lands as the event is set, and shutdown would then wait for ever.
    """
    timer = asyncio.get_running_loop().call_later(timeout, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


def hard_exit() -> None:
    log.error("shutdown took over %gs: exiting now", SHUTDOWN_DEADLINE)
    logging.shutdown()
    os._exit(0)


#: lobbyd's exit status when the loader it runs under was killed (128 + SIGKILL)
EXIT_LOADER_KILLED = 137


def parent_pid(pid: int) -> int:
    """The parent of `pid` (0 if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def binary_loader_pid() -> int | None:
    """The PID the operator started, when that is not this process (else None).

    The static binary is a chain: staticx's loader (the PID a shell, runit or
    systemd knows) -> PyInstaller's loader -> this Python process. staticx puts
    the binary's real path in STATICX_PROG_PATH: the ancestor running it is the
    loader. From source (not frozen) there is none.
    """
    if not getattr(sys, "frozen", False):
        return None
    prog = os.environ.get("STATICX_PROG_PATH")
    pid = os.getppid()
    if not prog:
        return pid  # a one-file build without staticx: PyInstaller's loader
    for _ in range(3):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe") == prog:
                return pid
        pid = parent_pid(pid)
        if pid <= 1:
            break
    return None


def invoked_name() -> str:
    """The name the program was called by (`lobbyctl` through a symlink, say).

    In the static binary sys.argv[0] is the path of the unpacked copy whatever
    the name used (staticx does not pass argv[0] on: JonathonReinhart/staticx#133),
    and STATICX_PROG_PATH has symlinks resolved: only the loader's own argv[0],
    in /proc/PID/cmdline, still has it.
    """
    argv0 = sys.argv[0]
    pid = binary_loader_pid()
    if pid is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError), \
                open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode()
    return os.path.basename(argv0)


def watch_binary_loader(loop: asyncio.AbstractEventLoop) -> None:
    """End this process as soon as the process the operator started is gone.

    `kill -9` of that PID (or of the loader after it) would otherwise leave this
    process running as an orphan that keeps publishing and holds the port. It
    ends the way `kill -9` ends lobbyd run from source: at once, no goodbye
    (peers expire it after TTL), but the loaders' temporary directories, which
    a dead loader can no longer remove, are removed first.
    """
    pid = binary_loader_pid()
    if pid is None:
        return
    parent = os.getppid()

    def gone() -> bool:  # a reused PID cannot fool it: our ancestry would differ
        return os.getppid() != parent or (parent != pid and parent_pid(parent) != pid)

    def stop_now() -> None:
        import shutil
        log.warning("pid %d (the static binary's loader) ended: exiting at once, no goodbye",
                    pid)
        leftovers = [os.environ.get("STATICX_BUNDLE_DIR", "")]  # staticx's loader is gone
        if os.getppid() != parent:  # and so is PyInstaller's
            leftovers.append(getattr(sys, "_MEIPASS", ""))
        for path in leftovers:
            if os.path.basename(path).startswith(("staticx-", "_MEI")):
                shutil.rmtree(path, ignore_errors=True)
        logging.shutdown()
        os._exit(EXIT_LOADER_KILLED)

    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has ended
    except (AttributeError, OSError):
        fd = -1
    if gone():  # checked after pidfd_open: the fd is the loader's, not a reused PID's
        if fd >= 0:
            os.close(fd)
        stop_now()
    elif fd >= 0:
        def on_readable() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            stop_now()
        loop.add_reader(fd, on_readable)
    else:  # no pidfd (old kernel): look five times a second
        def poll() -> None:
            if gone():
                stop_now()
            else:
                loop.call_later(0.2, poll)
        loop.call_later(0.2, poll)


def release_start_up_memory() -> None:
    """Once started, objects that live for ever (modules, code, configuration) leave the
    collector's rounds: each full collection then walks the registry only."""
    gc.collect()
    gc.freeze()


class RateLimitedLog:
    """At most `burst` lines per `interval` seconds; the rest are counted, then summed up."""

    def __init__(self, burst: int = 5, interval: float = 60.0):
        self.burst = burst
        self.interval = interval
        self.window = -interval
        self.count = 0
        self.suppressed = 0

    def info(self, message: str, *args: Any) -> None:
        self.log(logging.INFO, message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.log(logging.WARNING, message, *args)

    def log(self, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.window >= self.interval:
            if self.suppressed:
                log.log(level, "... and %d more like it in the last %ds", self.suppressed,
                        self.interval)
            self.window, self.count, self.suppressed = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            log.log(level, message, *args)
        else:
            self.suppressed += 1


def notify_systemd(state: str) -> None:
    """sd_notify(3) in a few lines: tell systemd we are READY=1 or STOPPING=1."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify %s: %s", state, exc)


class Daemon:
    """One lobbyd: local labels, the registry, NATS, the API, the callback."""

    def __init__(self, config: Config, environ: Mapping[str, str]):
        self.config = config
        self.environ = environ
        self.registry = Registry(config.ttl)
        self.label_cache = LabelCache()
        self.local_labels = LocalLabels(config.labels, Path(config.labels_path))
        self.runtime = RuntimeLabels(config.runtime_labels_file)
        self.hostname = config.hostname or socket.gethostname()
        self.labels: tuple[str, ...] = ()
        self.garbage_log = RateLimitedLog(burst=5)
        self.membership_log = RateLimitedLog(burst=20)
        self.counters = Counters()
        self.started = time.time()
        self.api = Api(self)
        self.http = HttpServer(self.api.handle)
        self.transports: list[Transport] = [
            TRANSPORTS[kind](config, environ, f"lobbyd {self.hostname}", self.on_connect,
                             self.tell_systemd) for kind in config.driver]
        self.callback = (CallbackRunner(config.callback, config.callback_cooldown,
                                        config.callback_first_run_delay,
                                        config.callback_timeout, self.registry_json)
                         if config.callback else None)
        self.tasks: list[asyncio.Future[Any]] = []
        self._stopping = False
        self._synced: set[Transport] = set()

    # local state ---------------------------------------------------------------
    def local_packet(self) -> Packet:
        return Packet(self.hostname, self.labels, int(time.time()))

    def refresh_local(self) -> None:
        """Re-read the label files and the hostname; a new name says goodbye for the old."""
        hostname = self.config.hostname or socket.gethostname()
        if hostname != self.hostname:
            log.info("hostname changed from %s to %s: saying goodbye for the old name",
                     self.hostname, hostname)
            self.schedule(self.publish(Packet(self.hostname), "goodbye"))
            if self.registry.apply_goodbye(self.hostname):
                self.registry_changed()
            self.hostname = hostname
        if not self.label_lock.locked():  # mid-save the file is older than our labels
            self.set_labels(self.local_labels.collect())

    def reread_labels(self) -> None:
        """The label files as they are on disk now (SPEC 3); a change is published at once."""
        if self.label_lock.locked():  # mid-save the file is older than our labels
            return
        before = self.labels
        self.set_labels(self.local_labels.collect())
        if self.labels != before:
            self.wake.set()  # the keep-alive loop publishes it now

    def set_labels(self, labels: tuple[str, ...]) -> None:
        if labels != self.labels:
            shown = ", ".join(labels[:20]) + (f" (+{len(labels) - 20} more)"
                                              if len(labels) > 20 else "")
            log.info("local labels: %s", shown or "(none)")
            self.labels = labels

    async def change_runtime_labels(self, add: Sequence[str], remove: Sequence[str]) -> None:
        """Publish the new labels at once, then save them (two fsyncs) off the event loop.

        OSError if they cannot be saved: then the old labels are published again,
        so a label is only kept (and the POST answered 200) once it is on disk.
        """
        async with self.label_lock:  # one read-modify-write of the file at a time
            current = self.runtime.read()
            new = changed_labels(current, add, remove)
            if new == current:
                return
            self.local_labels.collect()  # a file written just before must be in this packet
            self.set_labels(self.local_labels.with_file(self.runtime.path, new))
            await self.publish_local()
            try:
                await asyncio.to_thread(self.runtime.save, new)
            except OSError:
                self.set_labels(self.local_labels.with_file(self.runtime.path, current))
                await self.publish_local()
                raise

    # registry ------------------------------------------------------------------
    def registry_changed(self) -> None:
        if self.callback:
            self.callback.notify()

    def expire(self) -> None:
        dead = self.registry.expire(time.time())
        if dead:
            self.counters.left_expired += len(dead)
            log.info("expired (silent for over %ds): %s", self.config.ttl, ", ".join(dead[:20]))
            self.registry_changed()

    def registry_json(self) -> bytes:
        self.expire()
        return self.api.renderer(("all",)).render(self.registry.packets())

    def on_packet(self, data: bytes) -> None:
        """Every discovery packet of the fleet comes through here: keep it lean."""
        try:
            message, hostname, labels = decode_envelope(data, self.label_cache)
        except PacketError as exc:
            self.counters.dropped += 1
            self.garbage_log.warning("dropped a packet: %s", exc)
            return
        counters = self.counters
        if message == "hi":
            counters.his += 1
            change = self.registry.apply_hi(hostname, labels, time.time())
            if change:
                if change == NEW_HOST:
                    counters.joined += 1
                    self.membership_log.info("new host %s", hostname)
                else:
                    self.membership_log.info("new labels of %s", hostname)
                self.registry_changed()
        else:
            counters.goodbyes += 1
            if self.registry.apply_goodbye(hostname):
                counters.left_goodbye += 1
                self.membership_log.info("goodbye from %s", hostname)
                self.registry_changed()

    # publishing ----------------------------------------------------------------
    async def publish(self, packet: Packet, message: str = "hi") -> bool:
        """On every transport; True if at least one took it."""
        data = encode_envelope(packet, message)
        sent = 0
        for transport in self.transports:
            sent += await transport.publish(data)
        self.counters.published += sent
        return sent > 0

    async def publish_local(self) -> None:
        if not self.config.register:
            return
        packet = self.local_packet()
        # we list ourselves even while NATS is away; our own packet refreshes it later
        change = self.registry.apply_hi(packet.hostname, packet.labels, time.time())
        if change:
            self.counters.joined += change == NEW_HOST
            self.registry_changed()
        await self.publish(packet)

    async def keep_alive(self) -> None:
        while not self._stopping:
            self.refresh_local()
            await self.publish_local()
            await wait_event(self.wake, self.config.keep_alive)
            self.wake.clear()

    async def clean_up(self) -> None:
        """Expire hosts when they die, not only every CLEAN_EVERY seconds."""
        while not self._stopping:
            self.expire()
            pause = min(self.config.clean_every, self.registry.next_expiry() - time.time())
            await asyncio.sleep(max(0.05, pause + 0.01))

    async def on_connect(self, transport: Transport) -> None:
        """On every (re)connect: say hi at once, then learn the fleet from one peer."""
        await self.publish_local()
        self.schedule(self.sync(transport))

    async def sync(self, transport: Transport) -> None:
        """Join: learn every live host from one peer instead of waiting a keep-alive
        round, then answer the joins of others."""
        learned = 0

        def reply(data: bytes) -> bool:
            nonlocal learned
            count, complete = self.learn_from(data, time.time())
            learned += count
            return complete

        if await transport.ask_fleet(reply, SYNC_WINDOW):
            log.info("learned %d hosts from a peer over %s", learned, transport.kind)
        if learned:
            self.counters.joined += learned
            self.registry_changed()
        self._synced.add(transport)
        if len(self._synced) == len(self.transports):
            self.joined.set()
        await transport.serve_fleet(self.fleet_chunks)

    def learn_from(self, data: bytes, now: float) -> tuple[int, bool]:
        """Apply one chunk of a peer's answer: (hosts added, whether it was the last)."""
        try:
            reply = parse_json(data)
            added = 0
            for hostname, labels, age in reply["hosts"]:
                labels = self.label_cache.normalise(tuple(labels))
                if 0 <= float(age) < self.config.ttl and self.registry.learn(
                        self.label_cache.hostname(hostname), labels, now - float(age)):
                    added += 1
            return added, reply.get("done") is True
        except (ValueError, TypeError, KeyError, AttributeError, PacketError) as exc:
            self.garbage_log.warning("dropped a sync answer: %s", describe_error(exc))
            return 0, False

    def fleet_chunks(self, budget: int) -> list[bytes]:
        """The registry as a join answer: chunks of at most about `budget` bytes."""
        self.expire()
        now = time.time()
        chunks, chunk, size = [], [], 0
        for name, (labels, seen) in self.registry.hosts.items():
            item = json.dumps([name, labels, round(now - seen, 3)], ensure_ascii=False)
            if size + len(item) > budget and chunk:
                chunks.append(sync_chunk(chunk, False))
                chunk, size = [], 0
            chunk.append(item)
            size += len(item) + 1
        chunks.append(sync_chunk(chunk, True))
        return chunks

    # operating it: health, metrics, readiness ----------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, GET /v1/health): healthy while every transport is connected."""
        drivers = [transport.state() for transport in self.transports]
        healthy = all(driver["connected"] for driver in drivers)
        return healthy, {
            "status": "ok" if healthy else "disconnected", "hostname": self.hostname,
            "version": __version__, "uptime_s": int(time.time() - self.started),
            "hosts": len(self.registry), "drivers": drivers, "checks": self.check_states()}

    def check_states(self) -> dict[str, dict[str, Any]]:
        """name -> {"up", "since", "output"} of every health check (SPEC 9)."""
        return {}

    def metric_families(self) -> list[Family]:
        counters, transports = self.counters, self.transports
        runs = self.callback.runs if self.callback else {}
        checks = self.check_states()
        return [
            Family("lobbyd_build_info", "gauge", "lobbyd's version.",
                   [({"version": __version__}, 1)]),
            Family("lobbyd_hosts", "gauge", "Live hosts in the registry.",
                   [({}, len(self.registry))]),
            Family("lobbyd_local_labels", "gauge", "Labels this host publishes.",
                   [({}, len(self.labels))]),
            Family("lobbyd_connected", "gauge", "1 while the transport is connected.",
                   [({"driver": t.kind}, int(t.is_connected)) for t in transports]),
            Family("lobbyd_reconnects_total", "counter", "Reconnections after the first.",
                   [({"driver": t.kind}, t.reconnects) for t in transports]),
            Family("lobbyd_packets_received_total", "counter", "Valid discovery packets.",
                   [({"message": "hi"}, counters.his),
                    ({"message": "goodbye"}, counters.goodbyes)]),
            Family("lobbyd_packets_dropped_total", "counter", "Packets off the contract.",
                   [({}, counters.dropped)]),
            Family("lobbyd_packets_published_total", "counter", "Packets this host sent.",
                   [({}, counters.published)]),
            Family("lobbyd_hosts_joined_total", "counter", "Hosts that appeared.",
                   [({}, counters.joined)]),
            Family("lobbyd_hosts_left_total", "counter", "Hosts that left, by reason.",
                   [({"reason": "goodbye"}, counters.left_goodbye),
                    ({"reason": "expired"}, counters.left_expired)]),
            Family("lobbyd_callback_runs_total", "counter", "CALLBACK runs by result.",
                   [({"result": result}, runs.get(result, 0))
                    for result in ("ok", "failed", "timeout", "error")]),
            Family("lobbyd_http_requests_total", "counter", "HTTP responses by status code.",
                   [({"code": str(code)}, count)
                    for code, count in sorted(self.http.codes.items())]),
            Family("lobbyd_check_up", "gauge", "1 while the health check passes.",
                   [({"check": name}, int(state["up"]))
                    for name, state in sorted(checks.items())]),
            *process_families(),
        ]

    def status_text(self) -> str:
        """systemd's STATUS= line: what `systemctl status lobbyd` shows."""
        parts = []
        for transport in self.transports:
            if transport.is_connected:
                parts.append(f"connected to {transport.server}")
            elif transport.was_connected:
                parts.append(f"{transport.kind} connection lost; "
                             f"reconnecting to {transport.targets()}")
            else:
                parts.append(f"waiting for {transport.kind} at {transport.targets()}")
        if all(transport.is_connected for transport in self.transports):
            return "; ".join(parts) + f"; {len(self.registry)} hosts known"
        return "; ".join(parts) + "; the API keeps serving"

    def tell_systemd(self) -> None:
        notify_systemd(f"STATUS={self.status_text()}")

    async def announce_ready(self) -> None:
        """READY=1 once connected and synced, or after READY_TIMEOUT: never blocks a start."""
        waiting = asyncio.ensure_future(self.joined.wait())
        await asyncio.wait([waiting], timeout=READY_TIMEOUT)
        waiting.cancel()
        notify_systemd(f"READY=1\nSTATUS={self.status_text()}")
        release_start_up_memory()

    # lifecycle -----------------------------------------------------------------
    def schedule(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        if task in self.tasks:
            self.tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed: %s", describe_error(task.exception()),  # type: ignore
                      exc_info=task.exception())

    def request_stop(self, signame: str) -> None:
        if self._stopping:
            log.info("%s again: already stopping", signame)
            return
        self._stopping = True
        log.info("%s: stopping", signame)
        self.stop.set()
        # The last resort: whatever hangs, the process is gone within seconds.
        watchdog = threading.Timer(SHUTDOWN_DEADLINE, hard_exit)
        watchdog.daemon = True
        watchdog.start()

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM/SIGINT stop, SIGHUP re-reads labels now.

        Plain signal.signal(), not loop.add_signal_handler(): the loop puts the
        default (deadly) handler back when it closes, and a second SIGTERM landing
        then must still be harmless.
        """
        def on_signal(signum: int, _frame: Any) -> None:
            action = self.wake.set if signum == signal.SIGHUP else \
                (lambda: self.request_stop(signal.Signals(signum).name))
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are exiting
                loop.call_soon_threadsafe(action)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.joined = asyncio.Event()  # first connection and join sync done
        self.label_lock = asyncio.Lock()
        self.install_signal_handlers(loop)
        watch_binary_loader(loop)
        if not self.config.disable_api:
            await self.listen()  # first: a HOST we cannot listen on is a config error
        self.runtime.remove_stale_temp_files()
        self.refresh_local()  # before any request can be served: no await in between
        log.info("lobbyd %s starting as %s (%s)", __version__, self.hostname,
                 "publishing" if self.config.register else "client only, not publishing")
        warn_about_timing(self.config)
        self.schedule(self.announce_ready())
        for transport in self.transports:
            self.schedule(transport.run(self.on_packet))
        self.schedule(self.keep_alive())
        self.schedule(self.clean_up())
        if self.callback:
            self.schedule(self.callback.run())
        await self.stop.wait()
        await self.shutdown()

    async def listen(self) -> None:
        """Start the API; an address this machine does not have is bad configuration.

        A port in use is not: it may be free on the next try (exit 1, restart).
        """
        host, port = self.config.host, self.config.port
        try:
            await self.http.start(host, port)
        except OSError:
            problem = listen_problem(host, port)
            if problem:
                raise ConfigError(problem) from None
            raise
        log.info("API listening on %s port %d", host, port)

    async def shutdown(self) -> None:
        """Goodbye, flush, close: well under two seconds."""
        notify_systemd("STOPPING=1")
        self._stopping = True  # every loop checks it: a lost cancellation cannot hang us
        if self.callback:
            self.callback.stop()
        for task in list(self.tasks):
            task.cancel()
        if self.config.register and await self.publish(Packet(self.hostname), "goodbye"):
            log.info("said goodbye as %s", self.hostname)
            for transport in self.transports:
                await transport.said_goodbye()
        await asyncio.gather(*(transport.close(timeout=0.8) for transport in self.transports))
        await self.http.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=0.3)


def warn_about_timing(config: Config) -> None:
    """Accepted, as the Go daemon does, but said once: such hosts will flap."""
    if config.ttl < 2 * config.keep_alive:
        log.warning("TTL=%d is less than twice KEEP_ALIVE=%d: peers will drop this host "
                    "whenever one keep-alive is late or lost (hosts will flap); "
                    "use TTL of 3 to 6 times KEEP_ALIVE", config.ttl, config.keep_alive)


def sync_chunk(items: list[str], done: bool) -> bytes:
    done_text = "true" if done else "false"
    return f'{{"hosts":[{",".join(items)}],"done":{done_text}}}'.encode()


###############################################################################
# main(): argv, config, logging, run; errors become exit statuses here only.
###############################################################################


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level)
    # asyncio reports EMFILE on accept with a traceback; once per pause is plenty
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("nats").setLevel(logging.CRITICAL)


def check_drivers(config: Config) -> None:
    """A driver whose library is missing is bad configuration, said before anything runs."""
    import importlib.util

    if "Redis" in config.driver and importlib.util.find_spec("redis") is None:
        raise ConfigError("DRIVER=Redis needs the Python package redis: "
                          "pip install 'lobbyd[redis]'")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None and invoked_name() == "lobbyctl":  # a second name of the same program
        return ctl_main(args, os.environ)
    if args[:1] == ["ctl"]:
        return ctl_main(args[1:], os.environ)
    if args in (["--version"], ["-V"]):
        print(f"lobbyd {__version__}")
        return 0
    if args in (["--help"], ["-h"]):
        print(help_text())
        return 0
    if args:
        print(f"lobbyd: unexpected arguments {' '.join(args)!r}; see lobbyd --help "
              "(the client is `lobbyd ctl ...` or `lobbyctl ...`)", file=sys.stderr)
        return 2
    try:
        config = Config.from_env(os.environ)
        check_drivers(config)
    except ConfigError as exc:
        print(f"lobbyd: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config.log_level)
    try:
        asyncio.run(Daemon(config, os.environ).run())
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EX_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", describe_error(exc))
        return 1
    finally:
        # Interpreter shutdown puts the deadly default handlers back: a second
        # SIGTERM arriving now must stay as harmless as the first.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    return 0


###############################################################################
# lobbyctl: a client of the HTTP API, compatible with the Go daemon's lobbyctl.
# It shares the data shapes with the daemon, never its state.
###############################################################################

CTL_USAGE = """\
usage: lobbyctl [-host HOST] [-port PORT] [-proto http|https] [-token TOKEN] [-json]
                COMMAND [ARGS...]
       lobbyd ctl ... (the same)

commands:
  discovery                       this server's discovery packet
  discoveries                     every live server and its labels
  discoveries labels LABEL...     servers having any of these labels
  discoveries search PREFIX...    servers having a label starting with any of these
  resolve LABEL                   hostnames of the servers having LABEL
  labels add [--ttl S] LABEL...   add runtime labels (with --ttl: a lease of S seconds)
  labels del LABEL...             remove runtime labels
  health                          the daemon's health; exit status 1 when unhealthy
  prometheus NAME                 Prometheus target groups of job NAME

Flags take one or two dashes and `-flag value` or `-flag=value`; their defaults
come from the environment: HOST (127.0.0.1), PORT (1313), PROTOCOL (http), TOKEN.
-json prints the API's JSON on one line. Colour only on a terminal, never with
NO_COLOR set. Exit status: 0 success, 1 lobbyd answered an error or cannot be
reached, 2 bad usage."""


class CtlUsageError(LobbydError):
    """The command line is wrong: usage, exit status 2."""


class CtlError(LobbydError):
    """lobbyd answered an error or cannot be reached: exit status 1."""


@dataclass
class CtlOptions:
    proto: str = "http"
    host: str = "127.0.0.1"
    port: int = 1313
    token: str = ""
    json: bool = False

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.proto}://{host}:{self.port}"


CTL_VALUE_FLAGS = ("host", "port", "proto", "token")


def parse_ctl_args(argv: Sequence[str], environ: Mapping[str, str]
                   ) -> tuple[CtlOptions, list[str]]:
    """(options, command words); flags may stand anywhere before `--`."""
    values = {"proto": environ.get("PROTOCOL") or "http",
              "host": environ.get("HOST") or "127.0.0.1",
              "port": environ.get("PORT") or "1313", "token": environ.get("TOKEN", "")}
    as_json, words = False, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            words += args
            break
        name, sep, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or arg == "-" or name == "ttl":
            words.append(arg)  # --ttl belongs to `labels add`
        elif name in ("h", "help"):
            raise CtlUsageError("")
        elif name == "json":
            as_json = parse_ctl_bool(value) if sep else True
        elif name in CTL_VALUE_FLAGS:
            if not sep:
                if not args:
                    raise CtlUsageError(f"flag needs an argument: -{name}")
                value = args.pop(0)
            values[name] = value
        else:
            raise CtlUsageError(f"flag provided but not defined: {arg}")
    proto = values["proto"].strip().lower()
    if proto not in ("http", "https"):
        raise CtlUsageError(f"-proto {show(values['proto'])}: expected http or https")
    port = values["port"].strip()
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CtlUsageError(f"-port {show(values['port'])}: expected a number from 1 to 65535")
    host = values["host"].strip().strip("[]") or "127.0.0.1"
    return CtlOptions(proto, host, int(port), values["token"].strip(), as_json), words


def parse_ctl_bool(value: str) -> bool:
    try:
        return parse_bool("-json", value)
    except ConfigError as exc:
        raise CtlUsageError(str(exc)) from None


def ctl_request(options: CtlOptions, method: str, path: str, body: bytes = b"",
                timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of one request; CtlError when lobbyd cannot be reached."""
    import http.client

    if options.proto == "https":
        import ssl

        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            options.host, options.port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(options.host, options.port, timeout=timeout)
    headers = {"Authorization": f"Token {options.token}"} if options.token else {}
    try:
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise CtlError(f"cannot reach lobbyd at {options.base}: {reason}") from None
    finally:
        conn.close()


def ctl_call(options: CtlOptions, method: str, path: str, body: bytes = b"",
             accept: Sequence[int] = (200,)) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a request; CtlError for any other status."""
    status, data = ctl_request(options, method, path, body)
    text = data.decode("utf-8", "replace")
    if status not in accept:
        first = text.strip().splitlines()[0] if text.strip() else "(no message)"
        raise CtlError(f"lobbyd at {options.base} answered {status}: {first}")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class Painter:
    """ANSI colour on a terminal only, and never with NO_COLOR set (no-color.org)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text

    def label(self, label: str) -> str:
        name, sep, value = label.partition(":")
        return self.paint(name + sep, "36") + value if sep else label


def wants_colour(stream: Any, environ: Mapping[str, str]) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and not environ.get("NO_COLOR") \
        and environ.get("TERM") != "dumb"


def format_discoveries(packets: Sequence[Mapping[str, Any]], paint: Painter) -> str:
    """As the Go lobbyctl prints them: hostnames right-aligned, one label per line."""
    width = max((len(packet["hostname"]) for packet in packets), default=0)
    out = []
    for packet in packets:
        labels = packet.get("labels") or []
        name = paint.paint(packet["hostname"].rjust(width) if labels else packet["hostname"],
                           "1")
        if labels:
            out.append(f"{name}    {paint.label(labels[0])}")
            out += [" " * (width + 4) + paint.label(label) for label in labels[1:]]
        else:
            out.append(name)
        out.append("")
    return "".join(line + "\n" for line in out)


def format_discovery(packet: Mapping[str, Any], paint: Painter) -> str:
    lines = ["Hostname:", "  " + paint.paint(packet["hostname"], "1")]
    if packet.get("labels"):
        lines += ["Labels:", *("  " + paint.label(label) for label in packet["labels"])]
    return "".join(line + "\n" for line in lines)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(days or hours) + \
        [f"{minutes}m"] * bool(days or hours or minutes) + [f"{secs}s"]
    return " ".join(parts)


def format_health(health: Mapping[str, Any], paint: Painter, now: float) -> str:
    ok = health.get("status") == "ok"
    lines = [f"status:   {paint.paint(str(health.get('status')), '32' if ok else '31;1')}",
             f"hostname: {health.get('hostname')}", f"version:  {health.get('version')}",
             f"uptime:   {format_duration(health.get('uptime_s', 0))}",
             f"hosts:    {health.get('hosts')}"]
    for driver in health.get("drivers", []):
        ago = format_duration(max(0, now - driver.get("since", now)))
        state = f"connected to {driver.get('server')}" if driver.get("connected") \
            else paint.paint("disconnected", "31;1")
        lines.append(f"{driver.get('driver')}:     {state} for {ago}, "
                     f"{driver.get('reconnects', 0)} reconnects")
    for name, check in sorted(health.get("checks", {}).items()):
        state = paint.paint("up", "32") if check.get("up") else paint.paint("down", "31;1")
        output = f" ({check['output']})" if check.get("output") else ""
        lines.append(f"check {name}: {state}{output}")
    return "".join(line + "\n" for line in lines)


def format_groups(groups: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for group in groups:
        labels = " ".join(f"{key}={value}" for key, value in group.get("Labels", {}).items())
        lines.append(" ".join(group.get("Targets", [])) + (f"    {labels}" if labels else ""))
    return "".join(line + "\n" for line in lines)


def ctl_labels(options: CtlOptions, words: list[str]) -> None:
    if len(words) < 3 or words[1] not in ("add", "del"):
        raise CtlUsageError("expected: labels add [--ttl S] LABEL... or labels del LABEL...")
    action, rest, query = words[1], words[2:], ""
    if rest[0].lstrip("-").partition("=")[0] == "ttl":
        if action != "add":
            raise CtlUsageError("--ttl goes with labels add only")
        flag = rest.pop(0)
        ttl = flag.partition("=")[2] if "=" in flag else (rest.pop(0) if rest else "")
        if not ttl.isdigit():
            raise CtlUsageError(f"--ttl {show(ttl)}: expected whole seconds")
        query = f"?ttl={ttl}"
    if not rest:
        raise CtlUsageError(f"labels {action}: no labels given")
    body = "\n".join(rest).encode("utf-8")
    ctl_call(options, "POST" if action == "add" else "DELETE", "/v1/labels" + query, body)


def compact_json(value: Any) -> str:
    """JSON on one line, as the Go lobbyctl's -json prints it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def ctl_run(options: CtlOptions, words: list[str], out: Any, paint: Painter) -> int:
    """Run one command; the exit status."""
    from urllib.parse import quote

    command, args = words[0], words[1:]
    if command == "discoveries":
        path = "/v1/discoveries"
        if args:
            if args[0] not in ("labels", "search") or len(args) < 2:
                raise CtlUsageError("expected: discoveries [labels LABEL... | search PREFIX...]")
            key = "labels" if args[0] == "labels" else "prefixes"
            path += f"?{key}=" + quote(",".join(args[1:]), safe=":,")
        _, packets = ctl_call(options, "GET", path)
        out.write(compact_json(packets) + "\n" if options.json
                  else format_discoveries(packets, paint))
    elif command == "discovery" and not args:
        _, packet = ctl_call(options, "GET", "/v1/discovery")
        out.write(compact_json(packet) + "\n" if options.json else format_discovery(packet, paint))
    elif command == "resolve" and len(args) == 1:
        _, names = ctl_call(options, "GET", "/v1/resolve?label=" + quote(args[0], safe=":"))
        out.write(compact_json(names) + "\n" if options.json else "".join(n + "\n" for n in names))
    elif command == "prometheus" and len(args) == 1:
        _, groups = ctl_call(options, "GET", "/v1/prometheus/" + quote(args[0], safe=""))
        out.write(compact_json(groups) + "\n" if options.json else format_groups(groups))
    elif command == "health" and not args:
        status, health = ctl_call(options, "GET", "/v1/health", accept=(200, 503))
        out.write(compact_json(health) + "\n" if options.json
                  else format_health(health, paint, time.time()))
        return 0 if status == 200 else 1
    elif command == "labels":
        ctl_labels(options, words)
    else:
        raise CtlUsageError(f"unknown command or wrong arguments: {' '.join(words)}")
    return 0


def ctl_main(argv: Sequence[str], environ: Mapping[str, str], out: Any = None) -> int:
    """lobbyctl: parse, call the API, print; errors become exit statuses here only."""
    out = out or sys.stdout
    try:
        options, words = parse_ctl_args(argv, environ)
        if not words:
            raise CtlUsageError("no command given")
        return ctl_run(options, words, out, Painter(wants_colour(out, environ)))
    except CtlUsageError as exc:
        if not str(exc):
            print(CTL_USAGE)
            return 0
        print(f"lobbyctl: {exc}\n\n{CTL_USAGE}", file=sys.stderr)
        return 2
    except CtlError as exc:
        print(f"lobbyctl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `lobbyctl discoveries | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return 0


if __name__ == "__main__":
    sys.exit(main())
