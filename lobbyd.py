#!/usr/bin/env python3
"""lobbyd: every server knows every other server, and what runs on it.

Every server runs one lobbyd. It publishes a small JSON *discovery packet* (its
hostname and labels such as ``service:smtp``) every KEEP_ALIVE seconds on a NATS
subject, listens to everyone else's, forgets a host that goes silent for TTL
seconds (or at once on its goodbye), and answers a local HTTP API
(``curl localhost:1313/``). Wire-compatible with Lobby, the Go daemon
(by-cx/lobby). ``lobbyd --help`` lists the environment variables that configure it.

The map
-------
One module, read top to bottom in the order data flows. Each section owns the
state named beside it, and no other section changes that state; the Daemon builds
the parts and hands each its collaborators.

  Errors             LobbydError and its kinds (ConfigError: exit 78, in main() only)
  Small helpers      BoundedCache (every cache), deadline (the one timer), within(), plural(),
                     release_memory(), ssl_module() (OpenSSL only when TLS is used)
  Config             Config (frozen, from the environment), ENV_VARS, --help
  Labels             the label rules, label files, RuntimeLabels (its atomic file), Leases
  Checks             check files parsed (CheckSpec), up and down (CheckState): pure
  Wire format        Packet, the envelope (encode, decode), LabelCache, join-sync chunks
  Registry           Registry: hostname -> (labels, received); expiry, version, the
                     changes noted for the watchers and the renderer
  Fleet              Fleet: what the transports hear, applied to the registry; the
                     packet counters' bumps, the membership log, the join sync (rationed;
                     per-host: each peer's own packet), who may speak for whom (a sender's
                     own subject, our own hostname, MAX_HOSTS); CutOff:
                     whether every transport is lost (the registry then spares every host)
  Transports         Transport: the interface (run, publish, close, state)
  nats-py internals  every use of nats-py's private names, behind NatsPy: the one
                     switch back to plain nats-py (LOBBYD_PLAIN_NATS=1, or untested)
  NATS, Redis, kv    one Transport each: its connection and its state for /v1/health,
                     its subjects (shared or per-host);
                     TRANSPORTS (DRIVER name -> class) after the last of them
  Queries            View (what an answer shows: kind, labels, prefixes, name) and the
                     rules of what a view shows of a host, filters, Prometheus, and the
                     service model (host_services, host_address, node_meta) and what
                     Consul's routes show of it (consul_view, consul_shows): pure
  Renderers          the JSON text of answers, each host's block kept while it stays;
                     ConsulRenderer: Consul's shapes
  Answers            Answers: the latest answer of each view (plain and gzipped), the
                     renderers, the repeated request heads, how the bytes go
  Watchers           Watchers: each view's index, held requests, event streams (and, for
                     an answer that unites the hosts' parts, how many hosts add each key)
  HTTP messages      Request, Response, parsing with limits, Accept
  HTTP server        HttpServer: connections, limits (in all, per address, reserved
                     slots) and timers; knows one handler and one optional at-once
                     callable, no route, no JSON, no registry
  Health             Counters, Health (/v1/health, /metrics, systemd's STATUS)
  Request guard      RequestGuard: the Host names the API answers to, the origins that
                     may change its state (DNS rebinding, cross-site pages): pure
  API routes         Api: routing, the token, one short handler per route (Consul's
                     routes too: each answers a consul View)
  DNS                DnsAnswers (the zone DNS_DOMAIN from the registry and the service
                     model; answers kept per question and registry version), DnsServer
  Commands           run_command() (CALLBACK and exec checks; killed ones reaped), CallbackRunner
  Check runner       the probes, CheckRunner (a task per check)
  Local host         LocalHost: hostname, labels by source, leases, checks' runners
  Daemon             Daemon: wiring, its tasks, signals, readiness, shutdown
  Static binary      the staticx/PyInstaller loader chain, sd_notify
  main()             argv, logging, exit statuses
  lobbyctl           the client: the same program called lobbyctl (or `lobbyd ctl`)
  The page           PAGE_HTML, the page for people: a constant, last

A packet: a transport receives bytes -> Fleet.packet() decodes them once
(decode_envelope, LabelCache) -> Registry.apply_hi()/apply_goodbye() -> on a change,
Fleet tells the Daemon, which pokes the Watchers (indexes, held requests, streams)
and the callback. Nothing is rendered then: answers are built when asked for.

A request: HttpServer reads a head. If Answers knows that very head and its answer
is still current, it goes out at once (Api.at_once, from HttpProtocol.data_received:
it looks and changes nothing; its head passed the Host check the first time). Else
the head is parsed and Api.handle() checks Host and Origin (RequestGuard), the
token, routes, and calls the handler; a discovery route asks Answers.answer() for
its View: the cached answer at this registry version and second (rendered when
stale) with the Watchers' X-Lobby-Index, and X-Lobby-Stale while cut off (the same body,
another head). HttpServer writes what it gets.

Where a change goes:
- a new route: a handler in Api. If it answers from the registry: a View kind (and
  what it shows) in Queries, its renderer in Renderers; Answers then caches, indexes
  and sends it like every other view. Never a cache of its own.
- a new transport: a Transport subclass in a section after Redis, named in
  TRANSPORTS; it calls its Fleet with what it hears, and encodes what it publishes.
- a new source of local labels: LocalHost (its labels in files.extra[source]).
- do not touch: nats-py's private names outside their section, the Registry's state
  outside its methods, the bytes of the answers (clients of the Go daemon parse them).
"""

from __future__ import annotations

import sys

# OpenSSL (ssl, _hashlib) only when a configuration uses TLS: asyncio imports ssl at
# once, and with it libssl and libcrypto, ~5 MB of an idle lobbyd. asyncio learns of
# ssl when lobbyd first needs it (ssl_module()); hashlib and hmac use Python's own
# sha256 and compare_digest.
if "ssl" not in sys.modules and "_hashlib" not in sys.modules:
    sys.modules["ssl"] = sys.modules["_hashlib"] = None  # type: ignore[assignment]
    try:
        import asyncio
        import hashlib
        import hmac
    finally:
        del sys.modules["ssl"], sys.modules["_hashlib"]

import asyncio
import base64
import contextlib
import enum
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import operator
import os
import random
import re
import resource
import shlex
import signal
import socket
import threading
import time
import zlib
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

__version__ = "1.0.0"

log = logging.getLogger("lobbyd")
T = TypeVar("T")


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
# Small helpers: a cache that bounds itself, and the one timer mechanism (deadline).
# Used by every section; they own no state of their own.
###############################################################################


class BoundedCache(dict):  # type: ignore[type-arg]
    """A dict that forgets everything once it holds `entries` items or `cost` units.

    Forgetting all at once is crude but O(1) per insert, and hostile traffic can
    never grow it: each cache of LabelCache stays within a few dozen MB. Without a
    `cost`, only the entries count; a key put again replaces its value in place.
    """

    def __init__(self, entries: int, cost: float = math.inf):
        super().__init__()
        self.max_entries, self.max_cost, self.cost = entries, cost, 0

    def put(self, key: Any, value: Any, cost: int = 1) -> None:
        if key not in self and (len(self) >= self.max_entries or
                                self.cost + cost > self.max_cost):
            self.clear()
            self.cost = 0
        self[key] = value
        self.cost += cost


def release_memory() -> None:
    """Hand freed heap back to the system: after a flood, free memory would otherwise stay
    with the process. A full collection empties the interpreter's free lists, whose
    leftovers keep whole arenas of pymalloc; glibc's malloc_trim returns the rest (the
    static binary uses glibc too)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError, ImportError):  # not glibc: nothing to do
        pass


def plural(count: int, noun: str) -> str:
    """`1 host`, `2 hosts`: log lines read as sentences."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class deadline:  # lower case: used like a function, `with deadline(10, task.cancel):`
    """Calls `action()` if the `with` block outlasts `seconds` (math.inf: no deadline).

    One loop timer and no task: not asyncio.wait_for(), which costs a task per
    await and, on Python 3.9-3.11, can swallow a cancellation that lands as the
    awaited thing finishes. `action` ends the wait: `transport.abort` (the pending
    read or drain then fails), `event.set`, `task.cancel`.

    A deadline can also be moved, as a connection does for each of its steps (idle,
    head, body, write): moving it later costs one float, for the timer fires no later
    than the deadline set and then re-arms itself for the deadline set since; a busy
    connection's timer so fires about once per step length, not once per request.
    """

    __slots__ = ("action", "at", "handle", "loop")

    def __init__(self, seconds: float, action: Callable[[], object]):
        self.loop = asyncio.get_running_loop()
        self.action = action
        self.at = math.inf  #: loop time of the deadline (inf: none)
        self.handle: asyncio.TimerHandle | None = None
        self.move(seconds)

    def move(self, seconds: float) -> deadline:
        """The deadline is now `seconds` from now (math.inf: none for now)."""
        if seconds == math.inf:
            self.at = math.inf  # the timer stays armed: a later move() may need it
            return self
        self.at = at = self.loop.time() + seconds
        handle = self.handle
        if handle is None or handle.when() > at:  # it would fire too late
            if handle is not None:
                handle.cancel()
            self.handle = self.loop.call_at(at, self._fire)
        return self

    def __enter__(self) -> deadline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        """No deadline any more, and no timer."""
        self.at = math.inf
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        handle, self.handle = self.handle, None
        if self.at == math.inf:
            return  # no deadline now: armed again by the next move()
        if handle is not None and self.at <= handle.when():
            self.action()  # the deadline this timer was set for has passed
        else:
            self.handle = self.loop.call_at(self.at, self._fire)


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """The result of `awaitable`, or asyncio.TimeoutError after `seconds` (it is then
    cancelled). Run as a task of its own: a cancellation that comes from inside it (as
    nats-py cancels its own futures when its connection ends) stays inside; one of the
    caller still reaches the caller."""
    task = asyncio.ensure_future(awaitable)
    try:
        with deadline(seconds, task.cancel):
            await asyncio.wait([task])
    finally:
        task.cancel()  # the caller was cancelled: so is what it waited for
    if task.cancelled():
        raise asyncio.TimeoutError
    return task.result()


def ssl_module() -> Any:
    """The ssl module, imported when first used, and then handed to asyncio and nats-py.

    lobbyd imports asyncio without ssl (see the imports at the top): its modules
    hold None for ssl until this gives them the module, so every TLS user in
    lobbyd (tls://, https:// checks) gets the module here, not with `import ssl`.
    """
    import ssl

    for name, module in list(sys.modules.items()):
        if name.startswith(("asyncio.", "nats.")) and \
                isinstance(getattr(module, "ssl", ssl), (type(None), LazyModule)):
            module.ssl = ssl
    sslproto = sys.modules.get("asyncio.sslproto")
    if sslproto is not None and not hasattr(sslproto, "SSLAgainErrors"):
        # asyncio >= 3.11 defines it only when it imported ssl itself
        sslproto.SSLAgainErrors = (ssl.SSLWantReadError, ssl.SSLSyscallError)
    return ssl


class LazyModule(type(sys)):  # type: ignore[misc]
    """A stand-in for a module that a library imports at once but lobbyd's
    configuration may never use (see import_nats): `load()` (by default the
    import of the module) on first use, whose names it then holds."""

    def __init__(self, name: str, load: Callable[[], Any] | None = None):
        super().__init__(name)
        self._load = load

    def __getattr__(self, name: str) -> Any:
        import importlib

        if name.startswith("__"):  # a probe (copy, pickle, inspect): not a use
            raise AttributeError(name)
        module = self._load() if self._load else importlib.import_module(self.__name__)
        self.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return getattr(module, name)


###############################################################################
# Config: the environment variables of SPEC section 2, parsed once, frozen.
###############################################################################

TRUE_WORDS = {"1", "t", "true", "yes", "y", "on"}
FALSE_WORDS = {"0", "f", "false", "no", "n", "off"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
SUBJECT_RE = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
DATACENTER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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


def parse_allowed_hosts(name: str, value: str) -> tuple[str, ...]:
    """Host names for the Host header: a name, an IP address, .suffix, or *."""
    names = []
    for item in value.split(","):
        word = item.strip().lower().rstrip(".")
        if not word:
            continue
        bare = word[1:] if word.startswith(".") else word.strip("[]")
        if word != "*" and not re.fullmatch(r"[a-z0-9_]([a-z0-9_.:-]{0,251}[a-z0-9_])?", bare):
            raise ConfigError(f"{name}={show(value)}: expected comma-separated host names "
                              "(lobby.example.com, .example.com for its subdomains, or *)")
        names.append(word if word.startswith(".") else bare)
    return tuple(names)


DISCOVERY_MODES = ("broadcast", "kv")
DISCOVERY_SUBJECTS = ("shared", "per-host")


def parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """One of `choices`, in any case."""
    choice = value.strip().lower()
    if choice not in choices:
        raise ConfigError(f"{name}={show(value)}: expected {' or '.join(choices)}")
    return choice


def parse_discovery_mode(name: str, value: str) -> str:
    return parse_choice(name, value, DISCOVERY_MODES)


def parse_datacenter(name: str, value: str) -> str:
    value = value.strip()
    if not DATACENTER_RE.fullmatch(value):
        raise ConfigError(f"{name}={show(value)}: expected letters, digits, '-', '_' or '.' "
                          "(at most 64)")
    return value


DNS_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def parse_dns_domain(name: str, value: str) -> str:
    """A DNS zone such as lobby or lobby.example.org, with or without its trailing dot;
    kept lower case with the dot."""
    domain = value.strip().lower()
    domain = domain[:-1] if domain.endswith(".") else domain
    if not domain or len(domain) > 200 or \
            not all(DNS_LABEL_RE.fullmatch(part) for part in domain.split(".")):
        raise ConfigError(f"{name}={show(value)}: expected a DNS domain such as lobby "
                          "or lobby.example.org")
    return domain + "."


def parse_discovery_subjects(name: str, value: str) -> str:
    return parse_choice(name, value, DISCOVERY_SUBJECTS)


def parse_replicas(name: str, value: str) -> int:
    """KV_REPLICAS: auto (0: 3 on a JetStream cluster of three servers or more, else 1),
    or 1 to 5 (JetStream's own limit)."""
    if value.strip().lower() == "auto":
        return 0
    try:
        return parse_int(name, value, 1, 5)
    except ConfigError:
        raise ConfigError(f"{name}={show(value)}: expected auto or a whole number from 1 "
                          "to 5") from None


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
    "HTTP_ALLOWED_HOSTS": ("", parse_allowed_hosts,
                           "comma-separated names the API answers to in the Host header "
                           "besides IP addresses, localhost, the hostname and HOST "
                           "(.example.com: its subdomains; *: any)"),
    "HTTP_MAX_CONNECTIONS_PER_ADDRESS": ("250", int_in(1, 100000),
                                         "open API connections one client address may hold"),
    "DRIVER": ("NATS", parse_driver, "discovery transport: NATS, Redis, or NATS,Redis"),
    "NATS_URL": ("nats://127.0.0.1:4222", parse_nats_urls,
                 "NATS URL or comma-separated cluster URLs (nats://, tls://, user:pass@)"),
    "NATS_DISCOVERY_CHANNEL": ("lobby.discovery", parse_subject, "NATS subject"),
    "DISCOVERY_MODE": ("broadcast", parse_discovery_mode,
                       "broadcast (every host hears every keep-alive; the Go daemon's way) or "
                       "kv (JetStream key-value buckets, for large fleets; DRIVER=NATS only)"),
    "DISCOVERY_SUBJECTS": ("shared", parse_discovery_subjects,
                           "shared (one subject for all; the Go daemon's way) or per-host "
                           "(each host publishes on SUBJECT.host.HOSTNAME only, so server "
                           "permissions stop one host speaking for another)"),
    "KV_REPLICAS": ("auto", parse_replicas,
                    "replicas of the kv mode's buckets when lobbyd creates them: 1 to 5, or "
                    "auto (3 on a JetStream cluster of 3 servers or more, else 1)"),
    "REDIS_HOST": ("127.0.0.1", parse_host, "Redis server (DRIVER=Redis)"),
    "REDIS_PORT": ("6379", int_in(1, 65535), "Redis port"),
    "REDIS_DB": ("0", int_in(0, 65535), "Redis database number"),
    "REDIS_CHANNEL": ("lobby:discovery", parse_channel, "Redis pub/sub channel"),
    "REDIS_USERNAME": ("", lambda n, v: v.strip(),
                       "Redis ACL user of REDIS_PASSWORD (Redis 6+); empty = default"),
    "REDIS_PASSWORD": ("", lambda n, v: v, "Redis password (never logged)"),
    "LABELS": ("", parse_env_labels, "comma-separated labels of this server"),
    "LABELS_PATH": ("/etc/lobby/labels", lambda n, v: v.strip(),
                    "directory of label files, one label per line"),
    "RUNTIME_LABELS_FILENAME": ("_runtime", parse_filename,
                                "file in LABELS_PATH holding labels added through the API"),
    "CHECKS_PATH": ("/etc/lobby/checks", lambda n, v: v.strip(),
                    "directory of NAME.check files: labels published while a check passes"),
    "HOSTNAME": ("", lambda n, v: parse_hostname(n, v) if v.strip() else "",
                 "overrides the machine's hostname"),
    "CLEAN_EVERY": ("15", int_in(1, 86400), "at most this many seconds between clean-ups"),
    "KEEP_ALIVE": ("5", int_in(1, 86400), "seconds between keep-alive packets"),
    "TTL": ("30", int_in(1, 864000), "seconds after which a silent host is dead"),
    "CUT_OFF_KEEP": ("0", int_in(0, 864000),
                     "seconds a lobbyd cut off from every transport keeps the last known "
                     "fleet; 0 = for as long as the cut lasts"),
    "NODE_EXPORTER_PORT": ("9100", int_in(1, 65535), "default port of Prometheus targets"),
    "MAX_HOSTS": ("250000", int_in(1, 100_000_000),
                  "most hosts the registry holds; packets of new hosts past it are dropped"),
    "REGISTER": ("true", parse_bool, "false = client only: listen, never publish"),
    "CALLBACK": ("", parse_command, "command run (no shell) when the registry changes"),
    "CALLBACK_COOLDOWN": ("15", int_in(0, 86400),
                          "min seconds from the end of one callback run to the next start"),
    "CALLBACK_FIRST_RUN_DELAY": ("30", int_in(0, 86400),
                                 "no callback run before this many seconds after start"),
    "CALLBACK_TIMEOUT": ("60", int_in(1, 86400),
                         "a callback run still going after this many seconds is killed"),
    "LOG_LEVEL": ("INFO", parse_log_level, "DEBUG, INFO, WARNING or ERROR"),
    "DATACENTER": ("lobby", parse_datacenter,
                   "the datacenter lobbyd's Consul API (/v1/catalog/..., /v1/health/...) names"),
    "DNS_PORT": ("0", int_in(0, 65535),
                 "port to answer DNS on (UDP and TCP, on HOST); 0 = no DNS (needs the "
                 "package dnslib: lobbyd[dns])"),
    "DNS_DOMAIN": ("lobby.", parse_dns_domain, "the DNS zone lobbyd answers for"),
    "DNS_TTL": ("0", int_in(0, 2147483647), "TTL in seconds of the DNS records"),
}


@dataclass(frozen=True)
class Config:
    """lobbyd's whole configuration; build it with Config.from_env()."""

    token: str = ""
    host: str = "127.0.0.1"
    port: int = 1313
    disable_api: bool = False
    http_allowed_hosts: tuple[str, ...] = ()
    http_max_connections_per_address: int = 250
    driver: tuple[str, ...] = ("NATS",)
    nats_url: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    nats_discovery_channel: str = "lobby.discovery"
    discovery_mode: str = "broadcast"
    discovery_subjects: str = "shared"
    kv_replicas: int = 0
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    redis_channel: str = "lobby:discovery"
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    labels: tuple[str, ...] = ()
    labels_path: str = "/etc/lobby/labels"
    runtime_labels_filename: str = "_runtime"
    checks_path: str = "/etc/lobby/checks"
    hostname: str = ""
    clean_every: int = 15
    keep_alive: int = 5
    ttl: int = 30
    cut_off_keep: int = 0
    node_exporter_port: int = 9100
    max_hosts: int = 250_000
    register: bool = True
    callback: tuple[str, ...] = ()
    callback_cooldown: int = 15
    callback_first_run_delay: int = 30
    callback_timeout: int = 60
    log_level: str = "INFO"
    datacenter: str = "lobby"
    dns_port: int = 0
    dns_domain: str = "lobby."
    dns_ttl: int = 0

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
        if values["discovery_mode"] == "kv" and values["driver"] != ("NATS",):
            raise ConfigError("DISCOVERY_MODE=kv works with DRIVER=NATS only")
        if values["discovery_subjects"] == "per-host":
            check_per_host(values)
        return cls(**values)

    @property
    def runtime_labels_file(self) -> Path:
        return Path(self.labels_path) / self.runtime_labels_filename


#: what a hostname may not hold in DISCOVERY_SUBJECTS=per-host: NATS subject wildcards and
#: separators' misuse, Redis glob characters (ACL channel patterns are globs)
PER_HOST_BAD_RE = re.compile(r"[*>?\[\]\\]")


def check_per_host(values: Mapping[str, Any]) -> None:
    """DISCOVERY_SUBJECTS=per-host: the hostname must be a subject's (a channel's) tail."""
    if values["discovery_mode"] == "kv":
        raise ConfigError("DISCOVERY_SUBJECTS=per-host does not work with DISCOVERY_MODE=kv "
                          "(one bucket holds every host; use broadcast)")
    hostname = values["hostname"] or socket.gethostname()
    if not SUBJECT_RE.fullmatch(hostname) or PER_HOST_BAD_RE.search(hostname):
        raise ConfigError(f"HOSTNAME={show(hostname)}: with DISCOVERY_SUBJECTS=per-host the "
                          "hostname must be a NATS subject's tail: no spaces, no *, >, ?, [, ], "
                          "backslash, no empty part between dots")


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
        "harmless); SIGHUP re-reads the label files and check files now.",
        "Exit status: 0 stopped by a signal, 78 bad configuration (one line on stderr",
        "names the variable), 2 bad command-line arguments, 1 cannot start (e.g. the",
        "port is in use).",
        "",
        "API (curl localhost:1313/...; the README lists every route):",
        "  GET /, /v1/discoveries[?labels=a,b|?prefixes=p]   every live server",
        "  GET /v1/discovery         this server's packet",
        "  GET /v1/resolve?label=X   hostnames having label X",
        "  GET /v1/prometheus/NAME   Prometheus HTTP SD target groups of job NAME",
        "    ...&index=N&wait=D      (these four) held until the answer's X-Lobby-Index",
        "                            is no longer N, or for D (default 5m, at most 10m)",
        "    (these four, cut off from every transport: X-Lobby-Stale: seconds since the cut;",
        "     the last known fleet is kept, for CUT_OFF_KEEP seconds if set)",
        "  POST, DELETE /v1/labels   add, remove runtime labels (body: one per line)",
        "  POST /v1/labels?ttl=S     add leased labels, gone S seconds after the last POST",
        "  GET /v1/labels            the local labels by source",
        "  GET /v1/events[?labels=a,b|?prefixes=p]   Server-Sent Events of every change",
        "  GET /v1/health            200 while connected, 503 otherwise (JSON)",
        "  GET /metrics              Prometheus metrics of lobbyd itself",
        "  GET /ui                   the page for people (a browser at / gets it too)",
        "  GET /v1/catalog/..., /v1/health/..., /v1/agent/self, /v1/status/leader",
        "                            Consul's HTTP API, read-only, for Consul's clients",
        "                            (services from labels service:NAME[:port:P|:tag:T])",
        "",
        "Client: lobbyctl ... or lobbyd ctl ... (lobbyctl --help).",
    ]
    return "\n".join(lines)


###############################################################################
# Labels: validation, and the sources — env, label files, runtime file, leases.
###############################################################################

MAX_LABEL_BYTES = 1024
MAX_LABELS = 1000
MAX_LABEL_FILE_BYTES = 1 << 20
# Unicode's format characters (category Cf: bidi overrides such as U+202E, zero-width
# spaces and joiners, the BOM, tags): invisible, they make one name show as another
FORMAT_CHARS = ("\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
                "\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
                "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
                "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f")
# C0 and C1 controls, and the Unicode line and paragraph separators: anything
# str.splitlines() would break a line at must never be inside a label ...
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: ... nor a format character (labels and hostnames)
UNSHOWABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029" + FORMAT_CHARS + "]")


def validate_label(raw: str) -> str:
    """The label trimmed of white space, or LabelError saying what is wrong."""
    label = raw.strip()
    if not label:
        raise LabelError("empty label")
    if UNSHOWABLE_RE.search(label):
        raise LabelError(f"label {show(label)} contains a control character or an invisible "
                         "format character")
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
    # a new file, never one that is there: not a link planted at the name (O_EXCL
    # does not follow it), nor a file others have open; what is there is removed
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileExistsError:
            os.unlink(tmp)  # a link goes, not what it points at
            fd = os.open(tmp, flags, 0o644)
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
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise NotDurable(exc.errno, exc.strerror) from exc


class NotDurable(OSError):
    """The file was replaced, but its directory could not be synced: the new file may
    not survive a power loss (the old one may come back)."""


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
        #: labels that come and go without a file: "leases", "check:NAME" -> labels
        self.extra: dict[str, tuple[str, ...]] = {}

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
        labels = sorted(set(self.env_labels).union(*self._by_file.values(),
                                                   *self.extra.values()))
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

    def by_file(self) -> dict[str, list[str]]:
        """File name -> its labels, as last read."""
        return {Path(path).name: sorted(set(labels)) for path, labels in self._by_file.items()}


MAX_LEASE_TTL = 86400
TTL_RE = re.compile(r"[0-9]{1,6}")


def parse_ttl(value: str) -> int:
    """The `ttl` of POST /v1/labels?ttl=S: whole seconds from 1 to 86,400, else LabelError."""
    text = value.strip()
    if not TTL_RE.fullmatch(text) or not 1 <= int(text) <= MAX_LEASE_TTL:
        raise LabelError(f"ttl={show(value)}: expected whole seconds from 1 to {MAX_LEASE_TTL}")
    return int(text)


class Leases:
    """Labels that end `ttl` seconds after the last POST naming them (SPEC 9).

    In memory only: a lease is a promise of a running service, and a restarted
    lobbyd cannot know that the service still runs.
    """

    def __init__(self) -> None:
        self.ends: dict[str, float] = {}  # label -> monotonic time it ends

    def add(self, labels: Iterable[str], ttl: float, now: float) -> bool:
        """Start or refresh leases; True if a label was not leased before."""
        new = False
        for label in labels:
            new = new or label not in self.ends
            self.ends[label] = now + ttl
        return new

    def remove(self, labels: Iterable[str]) -> bool:
        """End leases now; True if any was leased."""
        return bool([self.ends.pop(label) for label in labels if label in self.ends])

    def expire(self, now: float) -> list[str]:
        """End the leases that are due and say which."""
        due = sorted(label for label, end in self.ends.items() if end <= now)
        for label in due:
            del self.ends[label]
        return due

    def next_end(self) -> float | None:
        return min(self.ends.values(), default=None)

    def labels(self) -> tuple[str, ...]:
        return tuple(sorted(self.ends))

    def seconds_left(self, now: float) -> dict[str, int]:
        # rounded up: "1" until the very end, never a misleading "0"
        return {label: max(0, math.ceil(end - now)) for label, end in sorted(self.ends.items())}


###############################################################################
# Checks: NAME.check files in CHECKS_PATH, a source of labels that come and go.
# Parsing and the up/down state are pure; the probes run in the check runner.
###############################################################################

CHECK_KINDS = ("http", "tcp", "exec")
CHECK_KEYS = ("labels", *CHECK_KINDS, "interval", "timeout", "rise", "fall")
CHECK_SUFFIX = ".check"
MAX_CHECK_FILE_BYTES = 64 * 1024
CHECK_SECONDS_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,3})?")


class CheckError(LobbydError, ValueError):
    """A .check file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class CheckSpec:
    """One check as its file describes it. Equal specs: the running check is kept."""

    name: str
    labels: tuple[str, ...]
    kind: str  # one of CHECK_KINDS
    target: str  # the URL, HOST:PORT or command line as written
    argv: tuple[str, ...] = ()  # exec: the command split like a shell would
    interval: float = 10.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 2


def check_seconds(key: str, value: str, low: float, high: float) -> float:
    if not CHECK_SECONDS_RE.fullmatch(value) or not low <= float(value) <= high:
        raise CheckError(f"key {key}: {show(value)} is not seconds from {low:g} to {high:g}")
    return float(value)


def check_count(key: str, value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 100:
        raise CheckError(f"key {key}: {show(value)} is not a whole number from 1 to 100")
    return int(value)


def split_host_port(key: str, value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT; CheckError naming `key` otherwise."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not PORT_RE.fullmatch(port) or not 0 < int(port) < 65536:
        raise CheckError(f"key {key}: {show(value)} is not HOST:PORT")
    return host, int(port)


def check_target(kind: str, value: str) -> tuple[str, ...]:
    """Validate the probe's target; for exec, the argv."""
    if kind == "http":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CheckError(f"key http: {show(value)} is not an http:// or https:// URL")
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise CheckError(f"key http: {show(value)} has a bad port") from None
        return ()
    if kind == "tcp":
        split_host_port("tcp", value)
        return ()
    try:
        argv = tuple(shlex.split(value))
    except ValueError as exc:
        raise CheckError(f"key exec: {exc}") from None
    if not argv:
        raise CheckError("key exec: empty command")
    return argv


def parse_check(name: str, text: str) -> CheckSpec:
    """The check in a .check file's text, or CheckError naming the key at fault."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise CheckError(f"line {number}: expected KEY=VALUE")
        if key not in CHECK_KEYS:
            raise CheckError(f"key {show(key, 30)}: unknown (known: {', '.join(CHECK_KEYS)})")
        if key in values:
            raise CheckError(f"key {key}: given twice")
        values[key] = value
    if not values.get("labels"):
        raise CheckError("key labels: missing (labels=a,b is required)")
    try:
        labels = tuple(sorted({validate_label(item) for item in split_list(values["labels"])}))
    except LabelError as exc:
        raise CheckError(f"key labels: {exc}") from None
    kinds = [kind for kind in CHECK_KINDS if kind in values]
    if len(kinds) != 1:
        raise CheckError("key http/tcp/exec: exactly one of them is needed, "
                         f"{len(kinds)} given")
    kind = kinds[0]
    return CheckSpec(
        name=name, labels=labels, kind=kind, target=values[kind],
        argv=check_target(kind, values[kind]),
        interval=check_seconds("interval", values.get("interval", "10"), 0.1, 86400),
        timeout=check_seconds("timeout", values.get("timeout", "2"), 0.1, 3600),
        rise=check_count("rise", values.get("rise", "2")),
        fall=check_count("fall", values.get("fall", "2")))


def scan_check_dir(directory: Path) -> tuple[dict[str, CheckSpec], dict[str, str]]:
    """(name -> check, file -> what is wrong with it) of every NAME.check; never raises."""
    checks: dict[str, CheckSpec] = {}
    problems: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except FileNotFoundError:
        return checks, problems  # no directory: no checks
    except OSError as exc:
        return checks, {str(directory): f"cannot list: {exc.strerror or exc}"}
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(CHECK_SUFFIX):
            continue
        name = entry.name[:-len(CHECK_SUFFIX)]
        try:
            if not entry.is_file():
                continue
            with open(entry.path, "rb") as handle:
                data = handle.read(MAX_CHECK_FILE_BYTES + 1)
            if len(data) > MAX_CHECK_FILE_BYTES:
                raise CheckError(f"larger than {MAX_CHECK_FILE_BYTES} bytes")
            checks[name] = parse_check(name, data.decode("utf-8"))
        except OSError as exc:
            problems[entry.path] = f"cannot read: {exc.strerror or exc}"
        except UnicodeDecodeError:
            problems[entry.path] = "not valid UTF-8"
        except CheckError as exc:
            problems[entry.path] = str(exc)
    return checks, problems


@dataclass
class CheckState:
    """Up or down, moved by `rise` passes or `fall` failures in a row. Starts down:
    a label is published once its service has shown it is there."""

    rise: int = 2
    fall: int = 2
    up: bool = False
    since: float = field(default_factory=time.time)
    streak: int = 0  # results in a row that disagree with `up`
    output: str = ""

    def record(self, passed: bool, output: str, now: float) -> bool:
        """Count one result; True when it moves the check up or down."""
        self.output = output
        if passed == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < (self.rise if passed else self.fall):
            return False
        self.up, self.since, self.streak = passed, now, 0
        return True


###############################################################################
# Wire format: the discovery packet, the envelope around it, the join sync's answer.
###############################################################################

MAX_HOSTNAME_BYTES = 253
#: the label rules (no control, separator or format character) and no space
HOSTNAME_RE = re.compile("[^\x00-\x20\x7f-\x9f\u2028\u2029" + FORMAT_CHARS + "]+")


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


class LabelCache:
    """Validated hostnames, labels and label lists, each stored once.

    Hosts share most labels, and a keep-alive repeats the last one: keyed by
    what was received, a known packet costs dict lookups instead of checks.
    """

    def __init__(self, entries: int = 200_000, chars: int = 16_000_000):
        self.lists = BoundedCache(entries, chars)  # cost: characters (+1 per label)
        self.strings = BoundedCache(entries, chars)
        self.hostnames = BoundedCache(entries, chars)

    def forget(self) -> None:
        """Drop everything (the registry lost most of its hosts: a flood ended)."""
        for cache in (self.lists, self.strings, self.hostnames):
            cache.clear()
            cache.cost = 0

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
        lists = self.lists
        known = lists.get(raw)
        if known is not None:
            return known
        if len(raw) > MAX_LABELS:
            raise PacketError(f"{len(raw)} labels, over {MAX_LABELS}")
        labels = list(map(self.strings.get, raw))  # labels seen before need no checks
        if None in labels:
            # A list with a label never seen is likely seen once (a counter, garbage):
            # it is cached when it comes again, with every label known by then.
            return tuple(sorted({self.label(label) if known is None else known
                                 for known, label in zip(labels, raw)}))
        result = tuple(sorted(set(labels)))
        # A list that arrived normalised (as every lobbyd sends it) is its own key:
        # the cache then holds no second copy of its strings.
        lists.put(result if raw == result else raw, result, sum(map(len, raw)) + len(raw))
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
#: what JSON calls white space; str.strip() would also take \x1c-\x1f, \x85, \xa0, \u2028 ...
JSON_WHITE_SPACE = " \t\n\r"


def parse_json(data: bytes) -> Any:
    """json.loads for the hot path: one C call when the payload has no leading space."""
    try:
        text = data.decode("utf-8")
        try:
            value, end = _scan_json(text, 0)
        except StopIteration:
            return json.loads(text)  # leading white space, or an error to describe
        if end != len(text) and text[end:].strip(JSON_WHITE_SPACE):
            raise ValueError("extra data after the JSON value")
        return value
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PacketError(f"not JSON: {str(exc)[:80]}") from None


#: a JSON string's content with no escape and no control character: the text is the value
_PLAIN = r'[^"\\\x00-\x1f]*'
#: the envelope exactly as lobbyd and the Go daemon write it: compact, keys in this order,
#: no escapes, an integer last_check (at most 18 digits: json.loads refuses huge ones)
ENVELOPE_RE = re.compile(
    r'\{"discovery":\{"hostname":"(' + _PLAIN + r')","labels":\[((?:"' + _PLAIN
    + r'"(?:,"' + _PLAIN + r'")*)?)\],"last_check":-?(?:0|[1-9][0-9]{0,17})\},'
    r'"message":"(hi|goodbye)"\}')


def decode_envelope(data: bytes, cache: LabelCache) -> tuple[str, str, tuple[str, ...]]:
    """(message, hostname, labels) of a NATS payload, or PacketError.

    This runs for every packet of the fleet. An envelope of the usual shape is
    one regex match (its strings are their own values); anything else, valid
    or not, goes through the JSON parser, which alone describes errors. Types
    are checked with `type() is`; label validation is the cache's.
    """
    try:
        match = ENVELOPE_RE.fullmatch(data.decode("utf-8"))
    except UnicodeDecodeError:
        match = None
    if match is not None:
        raw_hostname, raw_labels, message = match.groups()
        hostname = cache.hostname(raw_hostname)
        if not raw_labels or message == "goodbye":
            return message, hostname, ()
        return message, hostname, cache.normalise(tuple(raw_labels[1:-1].split('","')))
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


# The join sync's answer: the registry in chunks, each a JSON object
# {"hosts": [[hostname, [labels...], age in seconds], ...], "done": false|true},
# the last one done. Ages, not times: the peers' clocks differ.

def sync_chunk(items: Sequence[str], done: bool) -> bytes:
    """One chunk of a join answer from hosts already encoded by `sync_item`."""
    return f'{{"hosts":[{",".join(items)}],"done":{"true" if done else "false"}}}'.encode()


def sync_item(hostname: str, labels: Sequence[str], age: float) -> str:
    return json.dumps([hostname, labels, round(age, 3)], ensure_ascii=False)


def sync_chunks(hosts: Iterable[tuple[str, Sequence[str], float]], budget: int) -> list[bytes]:
    """(hostname, labels, age) of every host as join answer chunks of at most about
    `budget` bytes (a host bigger than that alone in its chunk); the last is done."""
    chunks, chunk, size = [], [], 0
    for hostname, labels, age in hosts:
        item = sync_item(hostname, labels, age)
        if size + len(item) > budget and chunk:
            chunks.append(sync_chunk(chunk, False))
            chunk, size = [], 0
        chunk.append(item)
        size += len(item) + 1
    chunks.append(sync_chunk(chunk, True))
    return chunks


def decode_sync_chunk(data: bytes, cache: LabelCache
                      ) -> tuple[list[tuple[str, tuple[str, ...], float]], bool]:
    """([(hostname, labels, age)], whether it was the last) of a join answer chunk;
    PacketError if anything in it is off the contract (the whole chunk then is)."""
    reply = parse_json(data)
    try:
        hosts = [(cache.hostname(hostname), cache.normalise(tuple(labels)), float(age))
                 for hostname, labels, age in reply["hosts"]]
        return hosts, reply.get("done") is True
    except PacketError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PacketError(f"not a join answer: {describe_error(exc)}") from None


###############################################################################
# Registry: hostname -> (labels, when we last heard it), with expiry. Also what the
# answers read off it: the changes not yet taken (watchers), the hosts noted as
# changed (the whole-registry renderer) and the kept carriers of resolve views.
###############################################################################


NEW_HOST, NEW_LABELS = 2, 1
#: apply_hi() of a new host while the registry holds MAX_HOSTS: not added (true, < 0)
FULL = -1
HEARD_LATER = 3  #: learn(): a peer heard a known host later than we did, labels unchanged
#: resolve views whose carriers the registry keeps (see `carrying()`) ...
MAX_INDEXED_LABELS = 16
#: ... until nobody asked for this many seconds: each costs every change of labels a test
INDEXED_LABEL_IDLE_S = 10.0
#: label changes the registry notes for the renderer before it cuts them (see `Noted`)
MAX_NOTED = 16384
#: a registry that loses more than this many hosts and over half of them (the end of a
#: flood of made-up names) gives the memory back (see Daemon.shrunk())
SHRINK_HOSTS = 10_000


class Noted:
    """The hostnames whose labels or presence changed, in order, a host once per change
    (keep-alives are not noted): a reader that keeps its place (the whole-registry
    renderer) renders again only their part of an answer. Cut when long: a reader
    whose place was cut looks at everything."""

    __slots__ = ("cut", "names")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.cut = 0  #: names dropped so far: a place is `cut + len(names)` at most

    @property
    def end(self) -> int:
        """The place after the last name noted."""
        return self.cut + len(self.names)

    def since(self, place: int) -> list[str] | None:
        """The names noted from `place` on; None if some were cut since."""
        if place < self.cut:
            return None
        return self.names[place - self.cut:]


class Registry:
    """Every live host. `version` changes whenever membership or labels change.

    Times are this daemon's clock when it received the packet: senders' clocks
    drift, and the sender's last_check is ignored.
    """

    def __init__(self, ttl: float, max_hosts: int = 250_000):
        self.ttl = ttl
        self.max_hosts = max_hosts  #: new hosts past it are refused (FULL): a flood stays bounded
        # hostname -> (labels, received): tuples of strings and floats, which the
        # garbage collector stops tracking, so its full rounds skip the registry
        self.hosts: dict[str, tuple[tuple[str, ...], float]] = {}
        self.version = 0
        self._oldest = float("inf")  # a lower bound of every `received`
        #: no host expires before this (see `spare()`)
        self.spared_until = 0.0
        self._order: list[str] | None = None  # sorted hostnames, until membership changes
        #: hostname -> (its labels before the first change not yet taken, or None if it
        #: was not here; why it left, if it did): what watchers diff (take_changes())
        self.changes: dict[str, tuple[tuple[str, ...] | None, str]] = {}
        #: resolve view -> [the hostnames it shows, when carrying() last asked], for the
        #: views asked about lately: a poll at fleet scale (100k hosts, every change a
        #: new version) then sorts its answer instead of scanning every host
        self._carriers = BoundedCache(MAX_INDEXED_LABELS)
        self.noted = Noted()  #: for the renderer (see Noted)

    def __len__(self) -> int:
        return len(self.hosts)

    def apply_hi(self, hostname: str, labels: tuple[str, ...], now: float,
                 own: bool = False) -> int:
        """Record a keep-alive: NEW_HOST, NEW_LABELS, or 0 (false) for no change; FULL
        for a new host while MAX_HOSTS are known (our own is always added)."""
        entry = self.hosts.get(hostname)
        if entry is None:
            if len(self.hosts) >= self.max_hosts and not own:
                return FULL
            if now < self._oldest:
                self._oldest = now
            self.hosts[hostname] = (labels, now)
            self.version += 1
            self._order = None
            self._note(hostname, None)
            if self._carriers:
                self._index(hostname, labels)
            return NEW_HOST
        if now < self._oldest:
            self._oldest = now
        if entry[0] != labels:
            self._note(hostname, entry[0])
            self.hosts[hostname] = (labels, now)
            self.version += 1
            if self._carriers:
                self._index(hostname, labels)
            return NEW_LABELS
        self.hosts[hostname] = (entry[0], now)
        return 0

    def learn(self, hostname: str, labels: tuple[str, ...], received: float) -> int:
        """A host heard second-hand (a peer's sync answer): NEW_HOST if it was unknown;
        if the peer heard it later than we did, that hearing counts (NEW_LABELS or
        HEARD_LATER); else 0, nothing changed (or no room: MAX_HOSTS)."""
        entry = self.hosts.get(hostname)
        if entry is not None and received <= entry[1]:
            return 0
        news = self.apply_hi(hostname, labels, received)
        if news == FULL:
            return 0
        return news or HEARD_LATER

    def apply_goodbye(self, hostname: str) -> bool:
        entry = self.hosts.pop(hostname, None)
        if entry is None:
            return False
        self._note(hostname, entry[0], "goodbye")
        if self._carriers:
            self._index(hostname, ())
        self.version += 1
        self._order = None
        return True

    def expire(self, now: float) -> list[str]:
        """Drop hosts silent for more than TTL; cheap when nothing can have expired."""
        if self._carriers:
            self._forget_unasked(now)
        if now - self._oldest <= self.ttl or now < self.spared_until:
            return []
        deadline = now - self.ttl
        dead = [name for name, entry in self.hosts.items() if entry[1] < deadline]
        for name in dead:
            self._note(name, self.hosts.pop(name)[0], "expired")
            if self._carriers:
                self._index(name, ())
        self._oldest = min((entry[1] for entry in self.hosts.values()), default=float("inf"))
        if dead:
            self.version += 1
            self._order = None
        return dead

    def compact(self) -> None:
        """After most hosts left: a dict never shrinks by itself, a copy fits; the names
        noted for the renderer are cut (it then looks at everything once)."""
        self.hosts = dict(self.hosts)
        self.noted.cut += len(self.noted.names)
        self.noted.names = []
    def spare(self, until: float) -> None:
        """No host expires before `until` (math.inf: until told otherwise), silent or not:
        a lobbyd cut off from the fleet cannot hear the silence it would expire hosts for,
        and after the cut each host has until then to be heard again."""
        self.spared_until = until

    def _note(self, hostname: str, before: tuple[str, ...] | None, left: str = "") -> None:
        # only the state before the first change counts: A -> B -> A is no change
        seen = self.changes.get(hostname)
        self.changes[hostname] = (before if seen is None else seen[0], left)
        names = self.noted.names
        names.append(hostname)
        if len(names) > MAX_NOTED:  # nobody renders (or not for long): a full look then
            self.noted.cut += len(names)
            names.clear()

    def carrying(self, view: View, now: float) -> list[str]:
        """The hostnames a resolve `view` shows, sorted (/v1/resolve). Call expire() first.

        The first ask scans every host; the answer is then kept up to date by every
        change until nobody asked for INDEXED_LABEL_IDLE_S seconds.
        """
        kept = self._carriers.get(view)
        if kept is None:
            kept = [{name for name, entry in self.hosts.items() if view.matching(entry[0])}, now]
            self._carriers.put(view, kept)
        kept[1] = now
        return sorted(kept[0])

    def _index(self, hostname: str, labels: tuple[str, ...]) -> None:
        for view, (names, _asked) in self._carriers.items():
            if view.matching(labels):
                names.add(hostname)
            else:
                names.discard(hostname)

    def _forget_unasked(self, now: float) -> None:
        for view, (_names, asked) in list(self._carriers.items()):
            if not 0 <= now - asked <= INDEXED_LABEL_IDLE_S:  # also a clock set back
                del self._carriers[view]

    def take_changes(self) -> dict[str, tuple[tuple[str, ...] | None, str]]:
        """The hosts changed since the last call (see `changes`), and start afresh."""
        changes, self.changes = self.changes, {}
        return changes

    def next_expiry(self) -> float:
        """The earliest moment a host can expire (inf when the registry is empty)."""
        due = self._oldest + self.ttl
        return due if due > self.spared_until else self.spared_until

    def order(self) -> list[str]:
        """Every hostname, sorted (kept until membership changes). Call expire() first."""
        if self._order is None:
            self._order = sorted(self.hosts)
        return self._order

    def packets(self, having: Iterable[str] = ()) -> list[Packet]:
        """Every host as a packet, sorted by hostname. Call expire() first.

        With `having`, only the hosts carrying any of those labels: a filtered
        answer then builds no packet for the rest of a big fleet.
        """
        self.order()
        hosts = self.hosts
        wanted = frozenset(having)
        if wanted:
            return [Packet(name, entry[0], int(entry[1])) for name in self._order
                    if not wanted.isdisjoint((entry := hosts[name])[0])]
        return [Packet(name, hosts[name][0], int(hosts[name][1])) for name in self._order]


###############################################################################
# Fleet: what the transports hear, applied to the registry. Every packet of every
# transport comes through one handler (decoded once here, with the LabelCache);
# the packet counters, the membership and garbage logs and the join sync (ask one
# peer on connecting, learn its answer, answer the joins of others) live here too.
# The transports hand it bytes where bytes arrived (a broadcast payload) and values
# where they have values (the kv mode's deletes); the Daemon gives it its collaborators.
###############################################################################

SYNC_QUEUE = "lobbyd"  #: the NATS queue group of the join requests: one peer answers
SYNC_WINDOW = 2.0  #: seconds a joining lobbyd waits for a peer's complete answer
#: join answers (the whole registry) a lobbyd sends: a burst of this many (daemons that
#: start together), then one per SYNC_ANSWER_EVERY seconds; a flood of requests costs a
#: few answers, not one each
SYNC_ANSWER_BURST, SYNC_ANSWER_EVERY = 4, 1.0
#: DISCOVERY_SUBJECTS=per-host: a peer answers a join request with its own packet after a
#: random delay of up to this many seconds, and at most once per second
SYNC_SPREAD = 1.0
#: seconds between two packets of ours published again because another claimed our name
REPUBLISH_EVERY = 1.0
#: seconds after a (re)connection in which a new host makes us publish our packet once
#: more: a daemon that connected a moment after us missed the first one, and its join
#: request may have found us still asking ours (out of the queue group)
HI_AGAIN_WITHIN = SYNC_WINDOW


class CutOff:
    """Whether this lobbyd is cut off from the fleet (every transport lost after one was
    connected) and since when. The Fleet sets it; the answers and Health read it.

    A cut-off lobbyd cannot tell its own isolation from the death of the fleet, so it
    keeps the hosts it knew (for CUT_OFF_KEEP seconds, 0: the whole cut) and says how
    stale its answers are: X-Lobby-Stale, whole seconds since the cut, from the first
    whole second on (a failover to another server of a cluster takes well under one).
    """

    __slots__ = ("keep", "since")

    def __init__(self, keep: float = 0):
        self.keep = keep  #: CUT_OFF_KEEP
        self.since: float | None = None  #: time.time() when the cut began; None: connected

    def stale(self, now: float) -> int:
        """Whole seconds since the cut; 0 when not cut off (or for less than a second)."""
        since = self.since
        return 0 if since is None else max(0, int(now - since))


class Fleet:
    """The fleet as the transports hear it, applied to the registry.

    `changed()`: the registry changed (watchers, the callback); `expire()`: expire the
    registry now; `say_hi()`: publish our packet now (awaitable); `state_changed()`: a
    transport connected or lost its connection (systemd's STATUS); `joined()`: every
    transport has connected and synced once; `schedule(coroutine)`: run it as a task
    of the daemon (cancelled at shutdown).
    """

    def __init__(self, registry: Registry, counters: Counters, cache: LabelCache, ttl: float,
                 *, changed: Callable[[], None], expire: Callable[[], None],
                 say_hi: Callable[[], Awaitable[None]], state_changed: Callable[[], None],
                 joined: Callable[[], None], schedule: Callable[[Awaitable[Any]], None],
                 garbage_log: RateLimitedLog | None = None,
                 membership_log: RateLimitedLog | None = None,
                 own_labels: Callable[[], tuple[str, ...]] = tuple, cut: CutOff | None = None):
        self.registry = registry
        self.counters = counters
        self.cache = cache
        self.ttl = ttl
        self.changed = changed
        self.expire = expire
        self.say_hi = say_hi
        self.state_changed = state_changed
        self.joined = joined
        self.schedule = schedule
        self.garbage_log = garbage_log or RateLimitedLog(burst=5)
        self.membership_log = membership_log or RateLimitedLog(burst=20)
        self.transports: list[Transport] = []  # each attaches itself when made
        self._synced: set[Transport] = set()
        self.hostname = ""  #: this host's name (the Daemon keeps it): per-host join requests
        #: our hostname while we publish (the Daemon keeps it): nobody else may speak for it
        self.own_hostname: str | None = None
        self.own_labels = own_labels  #: what we publish now
        self._sent_own: BoundedCache = BoundedCache(8)  #: label lists we published lately
        self._republished = -math.inf  # monotonic time of the last one
        self._republishing = False  #: one is scheduled
        self.impostor_log = RateLimitedLog(burst=5)
        self.refused_log = RateLimitedLog(burst=5)
        self._answers = float(SYNC_ANSWER_BURST)  #: join answers we may send now
        self._answered = time.monotonic()
        self._sync_hi_due = False  #: per-host: our answer to a join request is scheduled
        self._sync_hi_last = -math.inf
        self._hi_again_until = -math.inf  #: monotonic: a new host until then gets ours again
        self.cut = cut or CutOff()  #: whether we are cut off from the fleet (SPEC 16)

    def attach(self, transport: Transport) -> None:
        self.transports.append(transport)

    # what the transports hear ------------------------------------------------------
    def packet(self, data: bytes, quiet: bool = False, sender: str | None = None) -> None:
        """A discovery envelope as it arrived. Every packet of the fleet comes through
        here: keep it lean. `quiet`: part of a bulk read of the whole fleet (the kv
        mode's initial values), applied without a log line per host. `sender`: the
        host whose own subject it came on (DISCOVERY_SUBJECTS=per-host): it may speak
        for itself only."""
        try:
            message, hostname, labels = decode_envelope(data, self.cache)
        except PacketError as exc:
            if sender is not None and self.sync_request(data, sender):
                return
            self.counters.dropped += 1
            self.garbage_log.warning("dropped a packet: %s", exc)
            return
        if sender is not None and hostname != sender:
            self.counters.dropped_subject += 1
            self.garbage_log.warning("dropped a packet for %s sent on the subject of %s",
                                     show(hostname), show(sender))
            return
        if message != "hi":
            self.goodbye(hostname)
            return
        counters = self.counters
        counters.his += 1
        change = self.registry.apply_hi(hostname, labels, time.time())
        if change:
            if change < 0 or hostname == self.own_hostname:
                self.refused(hostname, labels, change)
                return
            if change == NEW_HOST:
                counters.joined += 1
                if not quiet:
                    self.membership_log.info("new host %s", hostname)
                if self._hi_again_until > -math.inf:
                    self.new_host_after_connecting()
            elif not quiet:
                self.membership_log.info("new labels of %s", hostname)
            self.changed()

    def new_host_after_connecting(self) -> None:
        """Two daemons that connect together can each miss the other's first packet
        (published before the other subscribed), and neither answers the other's join
        request while asking its own: the first new host heard soon after connecting
        gets our packet once more, instead of a keep-alive later."""
        due, self._hi_again_until = self._hi_again_until, -math.inf
        if time.monotonic() < due:
            self.schedule(self.say_hi())

    def refused(self, hostname: str, labels: tuple[str, ...], change: int) -> None:
        """A packet not applied: a new host while the registry is full, or another
        claiming our hostname (ours is put back, and published again at once)."""
        if change < 0:
            self.counters.dropped_full += 1
            self.refused_log.warning("registry full (MAX_HOSTS=%d): dropped the packet of "
                                     "new host %s", self.registry.max_hosts, show(hostname))
            return
        self.registry.apply_hi(hostname, self.own_labels(), time.time(), own=True)
        if labels in self._sent_own:
            return  # our own packet of a moment ago, late
        self.impostor(f"a packet claiming to be this host ({show(hostname)}) with other labels")

    def impostor(self, what: str) -> None:
        """Someone spoke for this host: say `what`, and publish our packet again, at once
        and then at most once per REPUBLISH_EVERY (the last impostor is answered too)."""
        self.counters.impostors += 1
        self.impostor_log.warning("%s: ignored; publishing ours again", what)
        if not self._republishing:
            self._republishing = True
            self.schedule(self._republish())

    async def _republish(self) -> None:
        try:
            await asyncio.sleep(max(0.0, self._republished + REPUBLISH_EVERY - time.monotonic()))
            self._republished = time.monotonic()
        finally:
            self._republishing = False
        await self.say_hi()

    def sent_own(self, labels: tuple[str, ...]) -> None:
        """We publish these labels (the Daemon says so): their echo is ours."""
        self._sent_own.put(labels, True)

    def goodbye(self, hostname: str) -> None:
        """A host left (it said so, or the kv mode's bucket lost its packet)."""
        self.counters.goodbyes += 1
        if hostname == self.own_hostname:
            self.impostor(f"a goodbye for this host ({show(hostname)}) from another")
            return
        if self.registry.apply_goodbye(hostname):
            self.counters.left_goodbye += 1
            self.membership_log.info("goodbye from %s", hostname)
            self.changed()

    # a transport's connection --------------------------------------------------------
    def connection_changed(self) -> None:
        """A transport connected or lost its connection. When the last one is lost, the
        cut begins: hosts no longer expire (for CUT_OFF_KEEP seconds, if set); when one
        is back, every host has TTL seconds from then to be heard again."""
        cut, now = self.cut, time.time()
        if any(transport.connected.is_set() for transport in self.transports):
            if cut.since is not None:
                lasted, cut.since = now - cut.since, None
                self.registry.spare(now + self.ttl)
                if lasted >= 1:  # (a failover's split second: the reconnection says it all)
                    log.info("connected again after %.1fs cut off; hosts not heard within "
                             "%ds (TTL) will expire", lasted, self.ttl)
        elif cut.since is None and any(transport.was_connected for transport in self.transports):
            cut.since = now
            self.registry.spare(now + cut.keep if cut.keep else math.inf)
            log.warning("cut off from %s: keeping the last known fleet (%s) %s",
                        " and ".join(transport.kind for transport in self.transports),
                        plural(len(self.registry), "host"),
                        f"for up to {cut.keep}s (CUT_OFF_KEEP)" if cut.keep
                        else "until a connection is back")
        self.state_changed()

    async def connected(self, transport: Transport) -> None:
        """On every (re)connect: say hi at once, then learn the fleet from one peer."""
        self._hi_again_until = time.monotonic() + HI_AGAIN_WITHIN
        await self.say_hi()
        self.schedule(self.sync(transport))

    async def sync(self, transport: Transport) -> None:
        """Join: learn every live host from one peer instead of waiting a keep-alive
        round, then answer the joins of others."""
        learned = again = 0
        asked = time.time()

        def reply(data: bytes) -> bool:
            nonlocal learned, again
            count, heard, complete = self.learn_chunk(data, asked)
            learned, again = learned + count, again + heard
            return complete

        if await transport.ask_fleet(reply, SYNC_WINDOW):
            log.info("learned %s from a peer over %s%s", plural(learned, "host"),
                     transport.kind, f"; {again} known heard again" if again else "")
        self._synced.add(transport)
        if len(self._synced) == len(self.transports):
            self.joined()
        await transport.serve_fleet(self.answer)

    def learn_chunk(self, data: bytes, asked: float) -> tuple[int, int, bool]:
        """Apply one chunk of a peer's join answer: (hosts added, known hosts the peer
        heard later than we did, whether it was the last).

        Ages count back from `asked`, when our request went out, not from now: the
        answer was made after it, so each hearing is at least that old, and an answer
        that waited in a queue cannot pass for newer than a packet we heard since (it
        would put back the labels that packet changed)."""
        try:
            hosts, done = decode_sync_chunk(data, self.cache)
        except PacketError as exc:
            self.garbage_log.warning("dropped a sync answer: %s", exc)
            return 0, 0, False
        learn, ttl, added, again, changed = self.registry.learn, self.ttl, 0, 0, False
        for hostname, labels, age in hosts:
            if 0 <= age < ttl:
                news = learn(hostname, labels, asked - age)
                if news == NEW_HOST:
                    added += 1
                elif news:
                    again += 1
                changed = changed or news in (NEW_HOST, NEW_LABELS)
        if changed:
            self.counters.joined += added
            self.changed()
        return added, again, done

    def answer(self, budget: int) -> list[bytes]:
        """The registry as a join answer: chunks of at most about `budget` bytes; none
        past SYNC_ANSWER_BURST answers, then one per SYNC_ANSWER_EVERY (anyone can ask)."""
        now = time.monotonic()
        self._answers = min(float(SYNC_ANSWER_BURST), self._answers +
                            (now - self._answered) / SYNC_ANSWER_EVERY)
        self._answered = now
        if self._answers < 1:
            self.counters.sync_refused += 1
            return []
        self._answers -= 1
        self.expire()
        now = time.time()
        return sync_chunks(((hostname, labels, now - seen)
                            for hostname, (labels, seen) in self.registry.hosts.items()),
                           budget)


    # DISCOVERY_SUBJECTS=per-host: join by asking every peer to speak for itself ------
    def sync_request(self, data: bytes, sender: str) -> bool:
        """A join request ({"message": "sync"} on its sender's own subject): we answer
        with our own packet on our own subject, after a random delay of up to
        SYNC_SPREAD, at most once per second. False if `data` is not one."""
        try:
            envelope = parse_json(data)
        except PacketError:
            return False
        if type(envelope) is not dict or envelope.get("message") != "sync" or \
                type(envelope.get("discovery")) is not dict:
            return False
        hostname = envelope["discovery"].get("hostname")
        if hostname != sender:
            self.counters.dropped_subject += 1
            self.garbage_log.warning("dropped a join request for %s sent on the subject of %s",
                                     show(str(hostname)), show(sender))
            return True
        if sender != self.own_hostname and not self._sync_hi_due:
            self._sync_hi_due = True
            self.schedule(self._answer_sync())
        return True

    async def _answer_sync(self) -> None:
        try:
            now = time.monotonic()
            at = max(now + random.uniform(0, SYNC_SPREAD), self._sync_hi_last + 1.0)
            await asyncio.sleep(at - now)
            self._sync_hi_last = time.monotonic()
        finally:
            self._sync_hi_due = False
        await self.say_hi()


###############################################################################
# Transports: the seam between the daemon and the fleet. A small base class, one
# subclass per kind (NATS, Redis), and the DRIVER table that picks them; the daemon
# holds a list of transports and never asks which kind it holds.
###############################################################################


async def answered(replies: asyncio.Queue[bytes | None], reply: Callable[[bytes], bool],
                   window: float) -> bool:
    """Feed a peer's join answer, chunk by chunk, to `reply` (which says whether a chunk
    was the last); False if the window closed first (a None) or nobody answers (b"")."""
    while True:
        data = await replies.get()
        if data is None:
            log.debug("sync: no complete answer within %gs", window)
            return False
        if not data:  # NATS's "no responders": nobody answers joins yet, we are the first
            return False
        if reply(data):
            return True


async def close_within(seconds: float, closing: Awaitable[Any], what: str) -> None:
    """Await `closing` (a flush, a close) for at most `seconds`, then go on: a close that
    fails, hangs or is cancelled from inside is logged, never raised. A cancellation of
    the caller still is."""
    try:
        await within(seconds, closing)
    except asyncio.TimeoutError:
        log.debug("%s: not done within %gs", what, seconds)
    except Exception as exc:
        log.debug("%s: %s", what, describe_error(exc))


class Transport:
    """One way to reach the fleet: connect for ever (with backoff), publish our packet,
    hand every one received to the Fleet, answer and ask a join sync where the transport
    can, close, and a state for /v1/health."""

    kind = ""

    def __init__(self, config: Config, environ: Mapping[str, str], name: str, fleet: Fleet):
        self.config = config
        self.environ = environ
        self.name = name
        #: told of every packet, every (re)connection once subscribed, every loss
        self.fleet = fleet
        self.connected = asyncio.Event()
        self.since = time.time()  # of the last change between connected and not
        self.reconnects = 0  # reconnections after the first connection
        self.was_connected = False
        self._warned = False  #: the current outage has been logged
        self._closing = False
        fleet.attach(self)

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

    async def run(self) -> None:
        """Connect for ever; everything heard goes to the Fleet."""
        raise NotImplementedError

    async def publish(self, packet: Packet, message: str = "hi") -> bool:
        """Publish our packet ("hi") or goodbye if connected; False if it could not be sent."""
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
        state = {"driver": self.kind, "connected": self.is_connected, "server": self.server,
                 "targets": self.targets(), "since": int(self.since),
                 "reconnects": self.reconnects}
        if getattr(self, "per_host", False):
            state["subjects"] = "per-host"
        return state

    def _changed(self, connected: bool) -> None:
        if connected != self.connected.is_set():
            self.since = time.time()
        if connected:
            self.was_connected = True
            self.connected.set()
        else:
            self.connected.clear()
        self.fleet.connection_changed()

    def _failed(self, server: str, exc: BaseException) -> None:
        """A failed attempt to reach the server: the first of an outage is a warning,
        the retries that follow are for debugging only."""
        if not self._warned:
            self._warned = True
            log.warning("%s unreachable at %s (%s); retrying, the API keeps serving",
                        server, self.targets(), describe_error(exc))
        else:
            log.debug("%s: %s", server, describe_error(exc))


###############################################################################
# nats-py internals: everything here leans on nats-py's private names; tested on
# nats-py 2.15.0-2.16.0 (NATS_PY_TESTED). Fenced: nothing outside this section touches
# a private name of nats-py. NatsPy is the one switch: with LOBBYD_PLAIN_NATS=1, or
# by itself when the installed nats-py is outside the tested versions or lacks a
# name used here, lobbyd runs on plain public nats-py: slower, the same behaviour.
#
# What the tricks buy, at fleet scale: a packet handed from the socket's bytes
# straight to Fleet.packet (no Msg, no queue, no task step per message:
# direct_client, direct_parser, direct_frames), a trickle of packets read in
# batches (BatchingReads), the kv watch's messages applied as they are parsed
# (DirectClient._stream_msg), and 1.6 MB less memory (import_nats).
###############################################################################

#: nats-py releases (major, minor) the tricks were tested on, lowest and highest;
#: pyproject.toml pins the dependency to them
NATS_PY_TESTED = ((2, 15), (2, 16))


def js_ack(reply: bytes) -> tuple[int, int, int] | None:
    """(stream sequence, delivery sequence, pending) of a JetStream message's reply
    subject, $JS.ACK.[domain.hash.]stream.consumer.delivered.sseq.dseq.ts.pending[.token];
    None if it is not one."""
    tokens = reply.split(b".")
    if len(tokens) < 9 or tokens[0] != b"$JS" or tokens[1] != b"ACK":
        return None
    at = 5 if len(tokens) == 9 else 7
    try:
        return int(tokens[at]), int(tokens[at + 1]), int(tokens[at + 3])
    except (ValueError, IndexError):
        return None


def nats_py_version(nats: Any) -> tuple[int, ...] | None:
    """The installed nats-py's version, read without importlib.metadata (see
    import_nats); None if unknown (a static binary carries no package metadata)."""
    version = getattr(getattr(getattr(nats, "aio", None), "client", None), "__version__", "")
    if not version or version == "0.0.0":
        site = Path(nats.__file__).resolve().parent.parent
        found = sorted(site.glob("nats_py-*.dist-info"))
        version = found[-1].name[len("nats_py-"):-len(".dist-info")] if found else ""
    numbers = re.match(r"(\d+)\.(\d+)", version)
    return (int(numbers[1]), int(numbers[2])) if numbers else None


def untested_nats_py(nats: Any) -> str:
    """Why the tricks below must not be used with this nats-py; "" if they may."""
    version, (low, high) = nats_py_version(nats), NATS_PY_TESTED
    if version is not None and not low <= version <= high:
        shown = [".".join(map(str, numbers)) for numbers in (version, low, high)]
        return f"nats-py {shown[0]} is not one tested ({shown[1]} to {shown[2]})"
    if direct_parser(nats) is None or not hasattr(nats.aio.client.Client, "_process_msg"):
        return "this nats-py lacks the private names of lobbyd's fast path"
    return ""


class NatsPy:
    """nats-py as lobbyd uses it: the module, a client class, and the hooks that hand
    messages straight to lobbyd; all of them plain nats-py when `plain`."""

    def __init__(self, environ: Mapping[str, str], urls: Sequence[str]):
        forced = environ.get("LOBBYD_PLAIN_NATS", "").lower() in ("1", "true", "yes", "on")
        self.nats = import_nats(urls, trick=not forced)
        #: why plain nats-py is used; "" when the tricks are
        self.plain = "LOBBYD_PLAIN_NATS is set" if forced else untested_nats_py(self.nats)
        if self.plain:
            api = getattr(getattr(self.nats, "js", None), "api", None)
            if isinstance(api, LazyModule):  # its real Header, on first use
                api.__dict__.pop("Header", None)
            log.info("NATS: %s: using plain nats-py (slower at fleet scale)", self.plain)

    def client(self, batch_reads: bool) -> Callable[[], Any]:
        """The class of the connection. `batch_reads`: read a trickle of packets in
        batches (BatchingReads), for the broadcast; the kv mode has no trickle, and its
        join must not wait on a pause."""
        if self.plain:
            return self.nats.aio.client.Client  # type: ignore[no-any-return]
        return direct_client(self.nats, batch_reads)  # type: ignore[no-any-return]

    def direct(self, nc: Any, sub: Any, handle: Callable[[bytes], None]) -> bool:
        """Hand the plain messages of `sub` to `handle` as the parser meets them;
        False if this connection cannot (its callback then does the same, slower)."""
        if self.plain or not hasattr(nc, "direct") or not isinstance(getattr(sub, "_id", None),
                                                                      int):
            return False
        nc.direct[sub._id] = handle
        return True

    @staticmethod
    def set_retry_wait(nc: Any, seconds: float) -> None:
        """Seconds nats-py waits before it tries a server again (its reconnect_time_wait,
        read on each attempt from the options it was connected with)."""
        options = getattr(nc, "options", None)
        if isinstance(options, dict) and "reconnect_time_wait" in options:
            options["reconnect_time_wait"] = seconds
    async def restart_stream(self, sub: Any) -> bool:
        """Have nats-py recreate the ordered consumer of `sub` now, from the first message
        it lacks, as it does by itself after two missed heartbeats (10 to 20 s later);
        False if this nats-py cannot (the heartbeats then do it)."""
        jsi = getattr(getattr(sub, "_sub", None), "_jsi", None)
        reset = getattr(jsi, "reset_ordered_consumer", None)
        if self.plain or reset is None or not isinstance(getattr(jsi, "_sseq", None), int):
            return False
        await reset(jsi._sseq + 1)
        return True

    def direct_stream(self, nc: Any, sub: Any,
                      handle: Callable[[bytes, bytes, bytes, int, int], None]) -> bool:
        """Hand the messages of an ordered JetStream consumer to `handle(subject, data,
        headers, stream sequence, pending)` as the parser meets them; False if not."""
        inner = getattr(sub, "_sub", None)
        jsi = getattr(inner, "_jsi", None)  # nats-py's ordered-consumer state
        if self.plain or not hasattr(nc, "direct") or not all(hasattr(jsi, name) for name in (
                "_dseq", "_sseq", "_fciseq", "_cmeta", "_active")):
            return False
        inner.direct_stream = handle
        return True


def import_nats(urls: Sequence[str], trick: bool = True) -> Any:
    """nats-py, imported without importlib.metadata where that changes nothing.

    nats-py imports importlib.metadata only to read its own version (the
    "version" of its CONNECT), and with it zipfile, email, csv, lzma, bz2 and
    tempfile: 1.6 MB of an idle lobbyd. Without it nats-py says 0.0.0, as the
    static binary (no package metadata in it) always did. Not for ws:// URLs:
    their aiohttp, which nats-py imports if it can, may need importlib.metadata.
    ssl, nats.js (JetStream) and datetime come as stand-ins (LazyModule), imported
    when used; `trick`: also nats.js.api's Header as StatusHeader, the names the
    tested releases read.
    """
    stand_ins: dict[str, Any] = {}
    if "ssl" not in sys.modules:  # its `import ssl` gets ssl_module() when used
        stand_ins["ssl"] = LazyModule("ssl", ssl_module)
    if "nats.js" not in sys.modules:  # JetStream, for DISCOVERY_MODE=kv (and email,
        # calendar with it): 1.4 MB. nats-py's client reaches it as the package's `js`
        stand_ins["nats.js"] = LazyModule("nats.js")
        stand_ins["nats.js"].api = LazyModule("nats.js.api", jetstream_api)
        if trick:  # all the tested releases' client reads of it (NatsPy may take it back)
            stand_ins["nats.js"].api.Header = StatusHeader
    if "datetime" not in sys.modules:  # for JetStream's metadata and dates
        stand_ins["datetime"] = LazyModule("datetime")
    if "uuid" not in sys.modules:  # `from uuid import uuid4`, for Subscription.next_msg()
        stand_ins["uuid"] = LazyModule("uuid")
        stand_ins["uuid"].uuid4 = lambda: __import__("uuid").uuid4()
    if trick and "importlib.metadata" not in sys.modules and \
            not any(url.startswith(("ws://", "wss://")) for url in urls):
        # None in sys.modules: `from importlib.metadata import version` raises ImportError
        stand_ins["importlib.metadata"] = None
    sys.modules.update(stand_ins)
    try:
        import nats
    finally:
        for name in stand_ins:
            del sys.modules[name]
    if "nats.js" in stand_ins:  # until a real `import nats.js` puts the module there
        nats.js = stand_ins["nats.js"]
    return nats


class StatusHeader(str, enum.Enum):
    """The names of nats.js.api.Header that nats-py's client reads in the status header
    of a message (a lone lobbyd's join request gets "503 no responders"): the module
    itself costs 0.6 MB of an idle lobbyd. Strings, as there: the headers hold the same
    keys whichever of the two a lookup uses (a test compares them)."""

    STATUS = "Status"
    DESCRIPTION = "Description"
    CONSUMER_STALLED = "Nats-Consumer-Stalled"


def jetstream_api() -> Any:
    """nats.js.api alone, for the names nats-py's client reads in status headers (a
    request no one answers has one): the rest of nats.js, which imports the same
    module when kv mode needs it, stays out."""
    import importlib
    import importlib.util

    if "nats.js" in sys.modules or "nats.js.api" in sys.modules:
        return importlib.import_module("nats.js.api")
    spec = importlib.util.find_spec("nats.js")  # the package, not run: where it is
    package = type(sys)("nats.js")
    package.__path__ = list(spec.submodule_search_locations or ())  # type: ignore[union-attr]
    stand_ins = {"nats.js": package}
    if "datetime" not in sys.modules:  # as in import_nats
        stand_ins["datetime"] = LazyModule("datetime")
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("nats.js.api")
    finally:
        for name in stand_ins:
            del sys.modules[name]


def direct_client(nats: Any, batch_reads: bool = True) -> Any:
    """nats-py's Client, handing the messages of chosen subscriptions to a function.

    nats-py builds a Msg, parses headers and goes through a queue and a task for
    every message; at fleet scale that is most of the cost of a packet. For a
    subscription in `direct`, a plain message skips all of it. If this nats-py
    has no such hook, the subscription's callback does the same job, slower.
    `batch_reads`: read a trickle of packets in batches (BatchingReads), for the
    broadcast; the kv mode has no trickle, and its join must not wait on a pause.
    """
    base = nats.aio.client.Client
    if not hasattr(base, "_process_msg"):
        return base
    parser = direct_parser(nats)

    class DirectClient(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.direct: dict[int, Callable[[bytes], None]] = {}
            if parser is not None and hasattr(self, "_ps"):
                self._ps = parser(self)

        @property  # type: ignore[override]
        def _transport(self) -> Any:
            return self.__dict__.get("_batching_transport")

        @_transport.setter
        def _transport(self, transport: Any) -> None:
            self.__dict__["_batching_transport"] = transport if transport is None or \
                not batch_reads else BatchingReads(transport, self)

        async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                               headers: bytes) -> None:
            handle = self.direct.get(sid)
            if handle is not None and not headers and not reply:
                try:
                    handle(data)
                except Exception as exc:  # never let one packet break the connection
                    log.error("handling a packet failed: %s", describe_error(exc))
            elif not (reply.startswith(b"$JS.ACK.") and self._stream_msg(
                    sid, subject, reply, data, headers)):
                await super()._process_msg(sid, subject, reply, data, headers)

        def _stream_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                        headers: bytes) -> bool:
            """A message of an ordered JetStream consumer with a `direct_stream`
            function: handled here, keeping nats-py's ordering state as it would.
            False for nats-py to handle it (another subscription; a gap, which
            makes nats-py recreate the consumer)."""
            sub = self._subs.get(sid)
            handle = getattr(sub, "direct_stream", None)
            jsi = getattr(sub, "_jsi", None)
            if handle is None or jsi is None or sub._pending_queue.qsize():
                return False  # (what nats-py queued before the hook was set goes first)
            ack = js_ack(reply)
            if ack is None or ack[1] != jsi._dseq:
                return False
            sseq, dseq, pending = ack
            jsi._dseq, jsi._sseq, jsi._active = dseq + 1, sseq, True
            jsi._fciseq += 1
            jsi._cmeta = reply.decode()  # for nats-py's heartbeat check
            sub._received += 1
            self.stats["in_msgs"] += 1
            try:
                handle(subject, data, headers, sseq, pending)
            except Exception as exc:  # never let one change break the connection
                log.error("handling a change failed: %s", describe_error(exc))
            return True

    return DirectClient


def direct_parser(nats: Any) -> Any:
    """nats-py's protocol parser, handing the plain MSGs of `direct` subscriptions
    straight to their functions; None if this nats-py's parser is not the one known.

    nats-py matches a regex, fills a dict, copies the payload twice and awaits a
    coroutine per message: more than lobbyd then spends on the packet. Any other
    frame (another command, a reply subject, headers, another subscription) goes
    to nats-py's own parser whole, once complete; a frame cut by the read waits
    for the next read. Lines it cannot measure go to nats-py with all that follows.
    """
    import importlib

    try:
        module = importlib.import_module("nats.protocol.parser")
        base, waiting = module.Parser, module.AWAITING_CONTROL_LINE
        if not isinstance(base().buf, bytearray):
            return None
    except (ImportError, AttributeError, TypeError):
        return None

    class DirectParser(base):  # type: ignore[misc, valid-type]
        async def parse(self, data: bytes = b"") -> None:
            if not self.nc.direct:  # (the kv connection) nothing to take here
                await super().parse(data)
                return
            buf = self.buf
            buf.extend(data)
            while buf and self.state == waiting:
                taken, other = direct_frames(bytes(buf), self.nc.direct)
                del buf[:taken]
                if other == 0:
                    return  # all taken, or a frame cut by the read
                if other < 0:
                    break
                frame = self.buf = bytearray(buf[:other])  # exactly one frame for nats-py
                del buf[:other]
                try:
                    await super().parse()
                finally:
                    if self.buf is frame:  # else a reconnect reset the parser meanwhile
                        buf[:0], self.buf = frame, buf
                if self.buf is not buf:
                    return
            await super().parse()

    return DirectParser


def direct_frames(buf: bytes, direct: Mapping[int, Callable[[bytes], None]]
                  ) -> tuple[int, int]:
    """Hand the leading plain `MSG <subject> <sid> <size>` frames of `direct` sids in
    `buf` to their functions: (bytes taken, length of the complete frame that comes
    next, for nats-py: 0 if none or cut, -1 if its control line is a mystery)."""
    pos, size = 0, len(buf)
    while pos < size:
        end = buf.find(b"\r\n", pos, pos + MAX_CONTROL_LINE)
        if end < 0:
            return pos, 0 if size - pos < MAX_CONTROL_LINE else -1
        fields = buf[pos:end].split(b" ")
        if fields[0] == b"MSG" and len(fields) == 4 and fields[1] \
                and fields[2].isdigit() and fields[3].isdigit():
            stop = end + 2 + int(fields[3])
            if stop + 2 > size:
                return pos, 0
            handle = direct.get(int(fields[2]))
            if handle is not None:
                try:
                    handle(buf[end + 2:stop])
                except Exception as exc:  # never let one packet break the connection
                    log.error("handling a packet failed: %s", describe_error(exc))
                pos = stop + 2
                continue
            return pos, stop + 2 - pos
        if fields[0] in (b"MSG", b"HMSG"):  # a reply subject, headers: measured again
            fields = buf[pos:end].split()
            if not fields[-1].isdigit():
                return pos, -1
            stop = end + 2 + int(fields[-1]) + 2
            return pos, (stop - pos if stop <= size else 0)
        return pos, end + 2 - pos
    return pos, 0


#: a NATS control line (MSG ...) is at most this long (the server's default limit)
MAX_CONTROL_LINE = 4096
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
    ssl = ssl_module()
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


#: where join answers may go: the inboxes of nats-py and of the Go client (nats.go)
INBOX_PREFIX = "_INBOX."

#: seconds between attempts to reach NATS; after authentication errors, doubled up to
#: AUTH_RETRY_MAX (a wrong password is not tried twice a second for ever)
RETRY_WAIT = 0.5
AUTH_RETRY_MAX = 30.0


def is_auth_error(exc: BaseException) -> bool:
    """The server refused the credentials (a wrong password, token or key)."""
    text = str(exc).lower()
    return type(exc).__name__ == "AuthorizationError" or "authorization violation" in text \
        or "authentication" in text


class NatsDriver(Transport):
    """The NATS connection: never blocks start-up, retries for ever, logs state changes once."""

    kind = "NATS"
    retry_wait = RETRY_WAIT  #: what nats-py waits now before trying a server again

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.urls = list(self.config.nats_url)
        self.subject = self.config.nats_discovery_channel
        self.sync_subject = self.subject + ".sync"
        #: DISCOVERY_SUBJECTS=per-host: each host publishes on SUBJECT.host.HOSTNAME only
        self.per_host = self.config.discovery_subjects == "per-host"
        self.host_prefix = self.subject + ".host."
        self.nc: Any = None
        self.natspy: NatsPy | None = None  # at run(): the API answers before this costs
        self._sync_sub: Any = None  # our part of the join queue group, while serving

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

    async def run(self) -> None:
        """Connect with backoff until it works, then let nats-py reconnect for ever.

        Every payload on the subject goes to Fleet.packet, a plain function: with
        nats-py's internals (NatsPy) it runs in the connection's read loop, as the
        wire parser meets each message.
        """
        self.natspy = NatsPy(self.environ, self.urls)
        if not await self.connect(self.natspy.client(batch_reads=True)):
            return
        packet = self.fleet.packet
        if self.per_host:
            await self.subscribe_per_host()
        else:
            async def slow_path(msg: Any) -> None:  # messages with headers, or plain nats-py
                packet(msg.data)

            sub = await self.nc.subscribe(self.subject, cb=slow_path,
                                          pending_msgs_limit=200_000,
                                          pending_bytes_limit=256 * 1024 * 1024)
            self.natspy.direct(self.nc, sub, packet)
        self._changed(True)
        await self.fleet.connected(self)

    async def subscribe_per_host(self) -> None:
        """SUBJECT.host.>: every packet speaks for the host its subject names, no other."""
        packet, start = self.fleet.packet, len(self.host_prefix)

        async def on_packet(msg: Any) -> None:
            packet(msg.data, sender=msg.subject[start:])

        await self.nc.subscribe(self.host_prefix + ">", cb=on_packet,
                                pending_msgs_limit=200_000,
                                pending_bytes_limit=256 * 1024 * 1024)

    async def connect(self, client: Callable[[], Any]) -> bool:
        """Connect with backoff until it works (then nats-py reconnects for ever);
        False if lobbyd is stopping first."""
        delay = 0.1
        while not self._closing:
            try:
                self.nc = client()
                await self.nc.connect(
                    servers=self.urls, name=self.name, allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=RETRY_WAIT, connect_timeout=2,
                    ping_interval=4, max_outstanding_pings=2, **self._tls_options(),
                    error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected, closed_cb=self._on_closed)
            except Exception as exc:  # nats-py raises many types here; all mean "try later"
                await self._on_error(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closing:
                break
            log.info("connected to NATS at %s", redact_url(self._current_url()))
            self._warned = False
            self._retry_at(RETRY_WAIT)
            return True
        return False

    def _tls_options(self) -> dict[str, Any]:
        # a CA store costs ~2 MB of memory: load it only for tls:// and wss:// URLs
        if any(url.startswith(("tls://", "wss://")) for url in self.urls):
            return {"tls": tls_context(self.environ)}
        return {}

    def _current_url(self) -> str:
        url = self.nc.connected_url if self.nc else None
        return url.geturl() if url else "?"

    def _retry_at(self, seconds: float) -> None:
        self.retry_wait = seconds
        if self.nc is not None and self.natspy is not None:
            self.natspy.set_retry_wait(self.nc, seconds)

    async def _on_error(self, exc: Exception) -> None:
        if is_auth_error(exc) and self.retry_wait < AUTH_RETRY_MAX:
            self._retry_at(min(self.retry_wait * 2, AUTH_RETRY_MAX))
            self._warned = True  # this says it, once per step
            log.warning("NATS unreachable at %s (%s: the server refused the credentials); "
                        "retrying in %gs, the API keeps serving", self.targets(),
                        describe_error(exc), self.retry_wait)
            return
        # nats-py reports every failed attempt; an operator needs the first one only
        if self.connected.is_set():
            log.debug("NATS: %s", describe_error(exc))
        else:
            self._failed("NATS", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self._changed(False)
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", redact_url(self._current_url()))
        self._warned = False
        self._retry_at(RETRY_WAIT)
        self.reconnects += 1
        self._changed(True)
        await self.fleet.connected(self)

    async def _on_closed(self) -> None:
        if not self._closing:
            log.error("NATS connection closed")

    async def publish(self, packet: Packet, message: str = "hi") -> bool:
        subject = self.host_prefix + packet.hostname if self.per_host else self.subject
        return await self.publish_to(subject, encode_envelope(packet, message))

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
        """One request on SUBJECT.sync; NATS hands it to one peer of the queue group.
        Per-host: a request on our own subject, which every peer answers with its own
        packet on its own subject within SYNC_SPREAD.

        Never to ourselves: nats-py renews our part of the group on reconnecting, and
        our own answer would teach us nothing, so we leave the group first (Fleet.sync
        serves again once answered)."""
        if self.per_host:
            hostname = self.fleet.hostname
            await self.publish_to(self.host_prefix + hostname,
                                  encode_envelope(Packet(hostname), "sync"))
            await asyncio.sleep(SYNC_SPREAD + 0.2)
            return False
        replies: asyncio.Queue[bytes | None] = asyncio.Queue()
        complete, sub = False, None
        serving, self._sync_sub = self._sync_sub, None
        if serving is not None:
            with contextlib.suppress(Exception):  # gone with the connection: not renewed
                await serving.unsubscribe()

        async def on_reply(msg: Any) -> None:
            replies.put_nowait(msg.data)

        try:
            with deadline(window, lambda: replies.put_nowait(None)):
                inbox = self.nc.new_inbox()
                sub = await self.nc.subscribe(inbox, cb=on_reply)
                await self.publish_to(self.sync_subject, b"{}", reply=inbox)
                complete = await answered(replies, reply, window)
        except Exception as exc:  # the connection went away: the next connect syncs again
            log.debug("sync failed: %s", describe_error(exc))
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        return complete

    async def serve_fleet(self, answer: Callable[[int], list[bytes]]) -> None:
        if self._sync_sub is not None or not self.is_connected or self.per_host:
            return  # per-host: the Fleet answers join requests among the packets

        async def on_request(msg: Any) -> None:
            # only to an inbox: never the registry onto the discovery subject, or any other
            if not msg.reply.startswith(INBOX_PREFIX):
                if msg.reply:
                    self.fleet.garbage_log.warning("dropped a join request: reply subject "
                                                   "%s is not an inbox", show(msg.reply))
                return
            for chunk in answer(max(4096, self.max_payload // 2)):
                await self.publish_to(msg.reply, chunk)

        # nats-py keeps the subscription across reconnects (ask_fleet leaves it)
        sub = await self.nc.subscribe(self.sync_subject, queue=SYNC_QUEUE, cb=on_request)
        if self._sync_sub is not None:  # another sync was quicker: once is enough
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            return
        self._sync_sub = sub

    async def close(self, timeout: float = 1.0) -> None:
        self._closing = True
        if self.nc is None or self.nc.is_closed:
            return
        if self.nc.is_connected:
            await close_within(timeout, self.nc.flush(timeout=1), "flush at shutdown")
        await close_within(timeout, self.nc.close(), "close at shutdown")


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
        #: DISCOVERY_SUBJECTS=per-host: each host publishes on CHANNEL:host:HOSTNAME only
        self.per_host = config.discovery_subjects == "per-host"
        self.host_prefix = self.channel + b":host:"
        self.client: Any = None
        self.pubsub: Any = None
        self._up = False
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

    async def run(self) -> None:
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
                username=config.redis_username or None,
                password=config.redis_password or None, socket_connect_timeout=2,
                socket_timeout=5, client_name=self.name.replace(" ", "-"),
                retry=Retry(NoBackoff(), 0))
            self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                if self.per_host:
                    await self.pubsub.psubscribe(self.host_prefix + b"*")
                else:
                    await self.pubsub.subscribe(self.channel)
                await self._connected()
                delay = 0.1
                await self._listen()
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
        await self.fleet.connected(self)

    def _lost(self, exc: Exception) -> None:
        if self._closing:
            return
        if self._up:
            self._up, self._warned = False, True  # the retries of this outage: debug only
            self._changed(False)
            log.warning("disconnected from Redis (%s); reconnecting", describe_error(exc))
        else:
            self._failed("Redis", exc)

    async def _listen(self) -> None:
        """Hand every message to its consumer; ping, and give up on a silent server."""
        pubsub = self.pubsub
        last_heard = next_ping = time.monotonic()
        while not self._closing:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is not None:
                last_heard = now
                if message["type"] == "message":
                    self._dispatch(message["channel"], message["data"])
                elif message["type"] == "pmessage":  # per-host: CHANNEL:host:HOSTNAME
                    self._dispatch_host(message["channel"], message["data"])
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + REDIS_PING_EVERY
            if now - last_heard > REDIS_SILENT_AFTER:
                raise ConnectionError(f"no answer for {REDIS_SILENT_AFTER:g}s")

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == self.channel:
            try:
                self.fleet.packet(data)
            except Exception as exc:  # never let one packet break the connection
                log.error("handling a packet failed: %s", describe_error(exc))
        elif channel == self.sync_channel:
            self.schedule_answer(data)
        elif channel in self._replies:
            self._replies[channel].put_nowait(data)

    def _dispatch_host(self, channel: bytes, data: bytes) -> None:
        sender = channel[len(self.host_prefix):].decode("utf-8", "replace")
        try:
            self.fleet.packet(data, sender=sender)
        except Exception as exc:  # never let one packet break the connection
            log.error("handling a packet failed: %s", describe_error(exc))

    async def _disconnect(self) -> None:
        for closing in (self.pubsub, self.client):
            if closing is not None:
                await close_within(1.0, closing.aclose(), "closing a Redis connection")

    async def publish(self, packet: Packet, message: str = "hi") -> bool:
        channel = self.host_prefix + packet.hostname.encode() if self.per_host else self.channel
        return await self._publish(channel, encode_envelope(packet, message))

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
        if self.per_host:  # as over NATS: every peer answers with its own packet
            hostname = self.fleet.hostname
            await self._publish(self.host_prefix + hostname.encode(),
                                encode_envelope(Packet(hostname), "sync"))
            await asyncio.sleep(SYNC_SPREAD + 0.2)
            return False
        request_id = os.urandom(8).hex()
        reply_channel = self.sync_channel + b"." + request_id.encode()
        replies: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._replies[reply_channel] = replies
        complete = False
        try:
            with deadline(window, lambda: replies.put_nowait(None)):
                await self.pubsub.subscribe(reply_channel)
                request = json.dumps({"id": request_id, "reply": reply_channel.decode()})
                listeners = await self.client.publish(self.sync_channel, request)
                # 0 listeners: nobody answers joins yet, we are the first
                complete = bool(listeners) and await answered(replies, reply, window)
        except Exception as exc:  # the connection went away: the next connect syncs again
            log.debug("sync over Redis failed: %s", describe_error(exc))
        finally:
            del self._replies[reply_channel]
            with contextlib.suppress(Exception):
                await self.pubsub.unsubscribe(reply_channel)
        return complete

    async def serve_fleet(self, answer: Callable[[int], list[bytes]]) -> None:
        if self.per_host:
            return  # the Fleet answers join requests among the packets
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
        if not reply_channel.encode().startswith(self.sync_channel + b"."):
            self.fleet.garbage_log.warning("dropped a join request: reply channel %s is "
                                           "not %s.ID", show(reply_channel),
                                           self.sync_channel.decode(errors="replace"))
            return  # never the registry onto the discovery channel, or any other
        claimed = await self.client.set(self.sync_channel + b":" + request_id.encode(), b"1",
                                        nx=True, ex=60)
        if claimed:
            for chunk in self._answer(REDIS_SYNC_CHUNK):
                await self._publish(reply_channel.encode(), chunk)

    async def close(self, timeout: float = 1.0) -> None:
        self._closing = True
        self._up = False
        await close_within(timeout, self._disconnect(), "closing Redis")


#: DRIVER names -> transport classes


###############################################################################
# The JetStream key-value mode (DISCOVERY_MODE=kv): for fleets past the broadcast's
# N² deliveries. Two buckets named after NATS_DISCOVERY_CHANNEL: SUBJECT_hosts holds
# each host's packet, written only when its labels change, and everyone watches it
# (its contents are the registry; a new lobbyd learns the fleet from the watch's
# initial values); SUBJECT_alive holds a key per host refreshed every KEEP_ALIVE
# and dropped by the server TTL seconds after the last refresh (MaxAge), and nobody
# watches it. A few lobbyds, elected through keys of the hosts bucket that carry a
# per-message TTL, compare the two every REAP_EVERY seconds and delete the packets
# of hosts whose liveness key is gone. Go daemons do not speak this mode.
###############################################################################

KV_REAPERS = 3  # reaper slots: no single lobbyd whose death stops the reaping
#: JetStream's answers to a stream of more replicas than it can place: not clustered,
#: insufficient resources (KV_REPLICAS=auto then creates the buckets with one)
KV_NO_REPLICAS = (10074, 10023)
#: + a stream's name: JetStream's advisory of a new leader of that stream
KV_LEADER_ELECTED = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED."
#: seconds between the reapers' scans of the liveness bucket: 1, and up to 2 past
#: 50,000 hosts (a scan of 100,000 keys costs ~40 ms): a dead host stays <= TTL + 2 s
REAP_EVERY = (1.0, 2.0, 50_000)
KV_SAFE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def kv_bucket_base(subject: str) -> str:
    """NATS_DISCOVERY_CHANNEL as a bucket name: lobby.discovery -> lobby_discovery."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", subject)


def kv_host_key(hostname: str) -> str:
    """A hostname as a KV key: h.NAME if NATS allows it, else x.BASE64URL(NAME)."""
    if KV_SAFE_KEY_RE.fullmatch(hostname):
        return "h." + hostname
    return "x." + base64.urlsafe_b64encode(hostname.encode()).decode().rstrip("=")


def kv_key_host(key: str) -> str | None:
    """The hostname of a host key (kv_host_key's inverse); None for other keys."""
    if key.startswith("h."):
        return key[2:]
    if key.startswith("x."):
        with contextlib.suppress(ValueError):
            raw = key[2:] + "=" * (-len(key[2:]) % 4)
            return base64.urlsafe_b64decode(raw).decode()
    return None


class NatsKvDriver(NatsDriver):
    """NATS with JetStream key-value buckets instead of the broadcast (DISCOVERY_MODE=kv)."""

    kind = "NATS-KV"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        base = kv_bucket_base(self.subject)
        self.data_bucket, self.alive_bucket = base + "_hosts", base + "_alive"
        self.hostname = self.name.removeprefix("lobbyd ")
        self.js: Any = None
        self.data: Any = None  # the hosts bucket (KeyValue)
        self.alive: Any = None  # the liveness bucket
        self.ready = False  # buckets bound and watched since the last (re)connect
        self.problem = ""  # why JetStream is not usable, for /v1/health
        self.keys: dict[str, int] = {}  # host key in the hosts bucket -> its revision
        self.put_labels: dict[str, Any] = {}  # host key -> labels we last wrote for it
        self.written: dict[str, tuple[Any, bytes]] = {}  # host key -> (labels, packet) kept
        #: host key -> hash of the packet applied for it: a packet written again as it
        #: was (every host's after a restart of the server) is not decoded again
        self.digests: dict[str, int] = {}
        self.reapers: dict[int, tuple[str, int]] = {}  # slot -> (holder, revision)
        self.marks: dict[int, int] = {}  # free slot -> revision of its delete marker
        self.slot: int | None = None  # our reaper slot
        self.slot_refreshed = 0.0
        self.initial = asyncio.Event()  # the watch's initial values are in
        self.learned = 0
        self._watcher: Any = None  # the subscription of the hosts bucket
        self._stale: dict[str, int] = {}
        self.warnings: list[str] = []  #: what is wrong with the buckets' settings (health)
        self.write_error = ""  #: why our last write failed, until one works (health)
        self._write_log = RateLimitedLog(burst=3)
        self._advised = False  # subscribed to the hosts bucket's leader elections
        self._checking: asyncio.Future[Any] | None = None  # _check_watch()
        self._setup_task: asyncio.Future[Any] | None = None
        self._tasks: list[asyncio.Future[Any]] = []

    @property
    def is_connected(self) -> bool:
        return self.ready and super().is_connected

    def state(self) -> dict[str, Any]:
        state = super().state()
        state.update(mode="kv", buckets=[self.data_bucket, self.alive_bucket],
                     reaper=self.slot is not None)
        if self.problem:
            state["error"] = self.problem
        if self.warnings:
            state["warnings"] = list(self.warnings)
        if self.write_error:
            state["write_error"] = self.write_error
        return state

    async def run(self) -> None:
        """Connect with backoff, then bind the buckets and watch; nats-py reconnects."""
        self.natspy = NatsPy(self.environ, self.urls)
        if not await self.connect(self.natspy.client(batch_reads=False)):
            return
        self._tasks.append(asyncio.ensure_future(self._reap_for_ever()))
        self._start_setup()

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", redact_url(self._current_url()))
        self._warned = False
        self._retry_at(RETRY_WAIT)
        self.reconnects += 1
        self._start_setup()  # the server may have restarted with its memory lost

    def _start_setup(self) -> None:
        self.ready = False
        if self._setup_task is not None:
            self._setup_task.cancel()
        self._setup_task = asyncio.ensure_future(self._set_up())

    async def _set_up(self) -> None:
        """Bind both buckets (creating them if need be) and watch the hosts bucket;
        retried every 2 s while JetStream is not there, said once."""
        while not self._closing:
            try:
                await self._bind()
                break
            except Exception as exc:  # no JetStream, no permission, a lost connection
                silent = type(exc).__name__ in ("ServiceUnavailableError", "NoRespondersError")
                problem = "JetStream unavailable: " + (
                    "no JetStream on this server" if silent else describe_error(exc))
                if problem != self.problem:
                    log.error("%s; DISCOVERY_MODE=kv needs nats-server with JetStream "
                              "(-js) at %s; retrying every 2s, the API keeps serving",
                              problem, self.targets())
                self.problem = problem
                self._changed(False)
                await asyncio.sleep(2)
        if self._closing:
            return
        if self.problem:
            log.info("JetStream available again: buckets %s and %s",
                     self.data_bucket, self.alive_bucket)
        self.problem = ""
        self.put_labels.clear()  # write everything again: the server may have lost it
        self.slot = None
        self.ready = True
        self._changed(True)
        await self.fleet.connected(self)

    async def _bind(self) -> None:
        from nats.js.api import KeyValueConfig, StorageType

        self.js = self.nc.jetstream(timeout=2)
        replicas = self.replicas()
        self.data = await self._bucket(KeyValueConfig(
            bucket=self.data_bucket, history=1, storage=StorageType.MEMORY, replicas=replicas,
            limit_marker_ttl=max(60, 2 * self.config.ttl)))  # reaper keys expire visibly
        self.alive = await self._bucket(KeyValueConfig(
            bucket=self.alive_bucket, history=1, storage=StorageType.MEMORY, replicas=replicas,
            ttl=self.config.ttl))
        await self._check_buckets()
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.unsubscribe()
        self._stale = dict(self.keys)  # what we knew: gone if the new watch lacks it
        self.keys, self.reapers, self.marks = {}, {}, {}
        self.initial.clear()
        self.learned = 0
        await self._watch()

    async def _watch(self) -> None:
        """An ordered consumer of the hosts bucket's last values, then of every change.

        Not nats-py's KeyValue.watch(), nor its per-message path: a Msg, a header
        dict, a queue and a task step for every message were over half of a
        100,000-host join. The connection's parser hands each message straight to
        _change (NatsPy.direct_stream); nats-py still recreates the consumer on a gap.
        """
        from nats.js.api import DeliverPolicy

        sub = await self.js.subscribe(
            f"$KV.{self.data_bucket}.>", stream=f"KV_{self.data_bucket}", cb=self._on_msg,
            ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=300, pending_msgs_limit=1_000_000,
            pending_bytes_limit=1 << 30)
        self.natspy.direct_stream(self.nc, sub, self._change)  # type: ignore[union-attr]
        self._watcher = sub
        if not self._advised:  # nats-py renews it on reconnecting
            self._advised = True
            with contextlib.suppress(Exception):  # not permitted: the heartbeats do it
                await self.nc.subscribe(KV_LEADER_ELECTED + f"KV_{self.data_bucket}",
                                        cb=self._leader_elected)
        info = await sub.consumer_info()
        if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
            self._initial_done()  # an empty bucket: nothing will say it

    async def _leader_elected(self, msg: Any) -> None:
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self._check_watch())

    async def _check_watch(self) -> None:
        """The hosts bucket has a new leader (its old one died, on a cluster): if the
        consumer of our watch was on the server that died, recreate it now."""
        await asyncio.sleep(random.random())  # not a whole fleet in the same millisecond
        sub = self._watcher
        if sub is None or not self.is_connected:
            return
        try:
            await sub.consumer_info()
        except Exception as exc:  # gone with its server, or JetStream still electing
            log.info("the watch of %s went with its server (%s); recreating it",
                     self.data_bucket, describe_error(exc))
            with contextlib.suppress(Exception):  # if this fails, the heartbeats retry
                await self.natspy.restart_stream(sub)  # type: ignore[union-attr]

    def _initial_done(self) -> None:
        if not self.initial.is_set():
            self.initial.set()
            if self._stale:
                self._tasks.append(asyncio.ensure_future(self._forget(self._stale)))

    def _change(self, subject: bytes, data: bytes, headers: bytes, revision: int,
                pending: int) -> None:
        """One message of the watch, straight from the connection's parser."""
        deleted = b"KV-Operation" in headers or b"Nats-Marker-Reason" in headers \
            if headers else False
        self._apply(subject[len(self.data_bucket) + 5:].decode(errors="replace"), data,
                    revision, deleted)
        if pending == 0:
            self._initial_done()

    async def _on_msg(self, msg: Any) -> None:
        """The same, for what nats-py delivers itself (plain nats-py, without the hook)."""
        ack = js_ack(msg.reply.encode())
        if ack is None:
            return
        revision, _delivery, pending = ack
        headers = msg.headers or {}
        deleted = "KV-Operation" in headers or "Nats-Marker-Reason" in headers
        self._apply(msg.subject[len(self.data_bucket) + 5:], msg.data, revision, deleted)
        if pending == 0:
            self._initial_done()

    def replicas(self) -> int:
        """KV_REPLICAS, or for auto: 3 when the NATS servers known (NATS_URL's and those
        the server announces: its cluster) are three or more, else 1."""
        if self.config.kv_replicas:
            return self.config.kv_replicas
        return 3 if len({url.netloc for url in self.nc.servers}) >= 3 else 1

    async def _bucket(self, config: Any) -> Any:
        try:
            return await self.js.create_key_value(config)
        except Exception as exc:  # it exists with other settings (another TTL): use it
            if config.replicas > 1 and not self.config.kv_replicas and \
                    getattr(exc, "err_code", None) in KV_NO_REPLICAS:
                log.warning("bucket %s: JetStream cannot place %d replicas (%s); created with "
                            "1 (KV_REPLICAS=%d insists)", config.bucket, config.replicas,
                            describe_error(exc), config.replicas)
                config.replicas = 1
                return await self._bucket(config)
            log.debug("bucket %s: %s; binding to it as it is", config.bucket,
                      describe_error(exc))
            return await self.js.key_value(config.bucket)

    async def _check_buckets(self) -> None:
        """Say (log, health) what in the buckets' settings, made by someone else, breaks
        the fleet: a size limit that drops or refuses packets, no TTL on liveness."""
        warnings = []
        hosts = (await self.data.status()).stream_info.config
        if hosts.max_bytes is not None and 0 < hosts.max_bytes < self.config.max_hosts * 512:
            warnings.append(f"bucket {self.data_bucket} is limited to {hosts.max_bytes} bytes "
                            f"(MAX_HOSTS={self.config.max_hosts} packets need up to "
                            f"{self.config.max_hosts * 512}): when full, packets are dropped "
                            "or refused and hosts vanish")
        if not (await self.alive.status()).ttl:
            warnings.append(f"bucket {self.alive_bucket} has no TTL (MaxAge): dead hosts are "
                            "never reaped; recreate it with MaxAge = TTL")
        for warning in warnings:
            if warning not in self.warnings:
                log.warning("%s", warning)
        self.warnings = warnings

    def _apply(self, key: str, value: bytes, revision: int, deleted: bool) -> None:
        """One change of the hosts bucket: the registry follows it. A value speaks only
        for the host its key names; our own key holds what we wrote, or we write it again."""
        if key.startswith("reaper."):
            with contextlib.suppress(ValueError):
                slot = int(key[7:])
                if deleted:
                    self.reapers.pop(slot, None)
                    self.marks[slot] = revision
                    if slot == self.slot:
                        self.slot = None
                else:
                    self.reapers[slot] = (value.decode(errors="replace"), revision)
            return
        hostname = kv_key_host(key)
        if hostname is None:
            return
        if hostname == self.fleet.own_hostname:  # (None: client only, or leaving)
            self._apply_own(key, value, revision, deleted)
            return
        if not deleted:
            self.keys[key] = revision
            digest = hash(value)
            if self.digests.get(key) == digest:
                return  # written again as it was: every host does so after a server restart
            self.digests[key] = digest
            quiet = not self.initial.is_set()  # the join's one line counts them
            self.learned += quiet
            self.fleet.packet(value, quiet, sender=hostname)
        elif self.keys.pop(key, None) is not None or not self.initial.is_set():
            self.digests.pop(key, None)
            self.put_labels.pop(key, None)  # ours reaped while we were away: write it again
            self.fleet.goodbye(hostname)
        else:
            self.digests.pop(key, None)

    def _apply_own(self, key: str, value: bytes, revision: int, deleted: bool) -> None:
        """Our own key: we know our packet. Another's value there, or its deletion
        (reaped while we were away, or deleted by another), is answered with ours."""
        if deleted:
            self.keys.pop(key, None)
        else:
            self.keys[key] = revision
        written = self.written.get(key)
        if written is None or (not deleted and value == written[1]):
            return  # not written yet (our first write follows), or our own echo
        self.put_labels.pop(key, None)  # the next publish writes it again
        self.fleet.impostor(f"our key {key} deleted (reaped while we were away, or by "
                            "another)" if deleted else f"another's value in our key {key}")

    async def _forget(self, stale: dict[str, int]) -> None:
        """After a restart of the server, hosts that do not write their packet again
        within KEEP_ALIVE (+ a second) are gone."""
        await asyncio.sleep(self.config.keep_alive + 1)
        for key in stale:
            hostname = kv_key_host(key)
            if key not in self.keys and hostname is not None:
                self.digests.pop(key, None)
                self.fleet.goodbye(hostname)

    async def publish(self, packet: Packet, message: str = "hi") -> bool:
        """A hi refreshes our liveness key, and writes the packet if its labels changed;
        a goodbye deletes both keys at once."""
        if not self.is_connected:
            return False
        try:
            key = kv_host_key(packet.hostname)
            if message != "hi":
                self.written.pop(key, None)
                await asyncio.gather(self.data.delete(key), self.alive.delete(key))
                return True
            await self.alive.put(key, b"")  # first: a packet is never older than its liveness
            labels = packet.labels
            if self.put_labels.get(key) != labels:
                # the same labels are the same bytes (last_check: their last change), so
                # that peers skip a packet written again after a restart of the server
                if self.written.get(key, (None,))[0] != labels:
                    self.written[key] = (labels, encode_envelope(packet))
                await self.data.put(key, self.written[key][1])
                self.put_labels[key] = labels
            self.write_error = ""
            return True
        except Exception as exc:  # a lost connection: the reconnect writes everything again
            self.write_error = describe_error(exc)
            self._write_log.warning("writing to the buckets %s, %s failed: %s",
                                    self.data_bucket, self.alive_bucket, self.write_error)
            return False

    async def serve_fleet(self, answer: Callable[[int], list[bytes]]) -> None:
        """Nothing: broadcast daemons asking SUBJECT.sync must not learn a kv fleet."""

    async def ask_fleet(self, reply: Callable[[bytes], bool], window: float) -> bool:
        """Join: the watch's initial values are the fleet; wait for them."""
        waiting = asyncio.ensure_future(self.initial.wait())
        try:
            with deadline(window, waiting.cancel):
                await asyncio.wait([waiting])
        finally:
            waiting.cancel()
        if self.initial.is_set():
            log.info("learned %s from the bucket %s", plural(self.learned, "host"),
                     self.data_bucket)
        return False

    # reaping: a few elected lobbyds delete the packets of hosts gone silent ----------
    async def _reap_for_ever(self) -> None:
        while not self._closing:
            low, high, hosts = REAP_EVERY
            await asyncio.sleep(max(low, min(high, len(self.keys) / hosts)))
            if not (self.is_connected and self.initial.is_set()):
                continue
            try:
                await self._campaign()
                if self.slot is not None:
                    await self._reap()
            except Exception as exc:  # a lost connection, a timeout: next round
                log.debug("reaping: %s", describe_error(exc))

    async def _campaign(self) -> None:
        """Hold a reaper slot: its key carries a TTL, refreshed every KEEP_ALIVE; a
        free slot (its holder died, the key expired) is taken by the first to create it."""
        now = time.monotonic()
        if self.slot is not None:
            if now - self.slot_refreshed < self.config.keep_alive:
                return
            slot = self.slot
            revisions = [self.reapers.get(slot, ("", 0))[1]]
        else:
            free = [slot for slot in range(KV_REAPERS) if slot not in self.reapers]
            if not free:
                return
            # a jitter so that a whole fleet does not race for the one free slot
            await asyncio.sleep(random.random() * min(2.0, self.config.keep_alive))
            free = [slot for slot in free if slot not in self.reapers]
            if not free or self.slot is not None:
                return
            slot = free[0]
            # after the key's expiry its last message is the server's delete marker,
            # which itself expires later: then the subject is empty (revision 0)
            revisions = [self.marks[slot], 0] if self.marks.get(slot) else [0]
        ack = None
        for revision in revisions:
            with contextlib.suppress(Exception):  # someone else holds it
                ack = await self.js.publish(
                    f"$KV.{self.data_bucket}.reaper.{slot}", self.hostname.encode(),
                    headers={"Nats-Expected-Last-Subject-Sequence": str(revision)},
                    msg_ttl=self.config.ttl)
                break
        if ack is None:
            if self.slot is not None:
                log.info("no longer a reaper (slot %d)", slot)
            self.slot = None
            return
        if self.slot is None:
            log.info("reaping expired hosts (reaper slot %d of %d)", slot, KV_REAPERS)
        self.slot, self.slot_refreshed = slot, now
        self.reapers[slot] = (self.hostname, ack.seq)

    async def _reap(self) -> None:
        """Delete the packets whose liveness key is gone. The packets first, then the
        liveness keys: a host writes its liveness key before its packet."""
        packets = dict(self.keys)
        alive = await self._alive_keys()
        dead = [key for key in packets if key not in alive]
        for key in dead:
            with contextlib.suppress(Exception):  # another reaper was first
                await self.data.delete(key, last=packets[key])
        if dead:
            log.info("reaped %s silent for over %ds: %s", plural(len(dead), "host"),
                     self.config.ttl,
                     ", ".join(filter(None, map(kv_key_host, dead[:20]))))

    async def _alive_keys(self) -> set[str]:
        """The keys of the liveness bucket, from the stream's subject list (paged)."""
        prefix = f"$KV.{self.alive_bucket}."
        subject = f"$JS.API.STREAM.INFO.KV_{self.alive_bucket}"
        keys: set[str] = set()
        offset = 0
        while True:
            request = json.dumps({"subjects_filter": prefix + ">", "offset": offset})
            reply = json.loads((await self.nc.request(subject, request.encode(),
                                                      timeout=5)).data)
            if "error" in reply:
                raise LobbydError(reply["error"].get("description", "stream info failed"))
            subjects = reply.get("state", {}).get("subjects") or {}
            keys.update(name[len(prefix):] for name in subjects)
            offset += len(subjects)
            if not subjects or offset >= reply.get("total", 0):
                return keys

    async def close(self, timeout: float = 1.0) -> None:
        self._closing = True
        for task in [*self._tasks, self._setup_task, self._checking]:
            if task is not None:
                task.cancel()
        await super().close(timeout)


#: DRIVER name -> its transport; NATS-KV is picked by DISCOVERY_MODE=kv, not by name
TRANSPORTS: dict[str, type[Transport]] = {"NATS": NatsDriver, "Redis": RedisDriver,
                                          "NATS-KV": NatsKvDriver}


###############################################################################
# Queries: what an answer shows. A View (kind, labels, prefixes, name) is parsed once
# from a request; View.matching() is the one rule of which labels of a host a view
# looks at, used to select hosts, to diff them for watchers, to find the views a
# change can touch, and by the registry's kept carriers. Prometheus target groups.
###############################################################################

PROM_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
PORT_RE = re.compile(r"[0-9]{1,5}")


class View(NamedTuple):
    """One answer a request asks for: the route, the renderer, the watchers and the
    registry's carriers all key on it.

    kind: all, labels (hosts with any of `labels`), prefixes (hosts with a label
    starting with any of `prefixes`), resolve (the hosts carrying `labels[0]`),
    prometheus (job `name`; `prefixes` holds its labels' prefix), discovery (the
    local packet: nothing of the registry), or consul (a route of Consul's API: see
    consul_view()).
    """

    kind: str
    labels: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    name: str = ""

    @classmethod
    def resolve(cls, label: str) -> View:
        return cls("resolve", (label,))

    @classmethod
    def job(cls, name: str) -> View:
        """A Prometheus job's target groups: the host's prometheus:NAME... labels."""
        return cls("prometheus", prefixes=(f"prometheus:{name}",), name=name)

    def matching(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """The labels of a host that this view looks at (empty: the host is not in its
        answer, except for `all`, which shows every host). A host's change touches the
        answer only through them: see triggers()."""
        if self.kind == "all":
            return labels
        wanted = self.labels
        if wanted:
            if len(wanted) == 1:  # resolve, and most label filters: no generator
                return wanted if wanted[0] in labels else ()
            return tuple(label for label in labels if label in wanted)
        prefixes = self.prefixes
        return tuple(label for label in labels if label.startswith(prefixes)) if prefixes \
            else ()

    def shows(self, hostname: str, labels: tuple[str, ...] | None, port: int) -> Any:
        """What the answer shows of a host carrying `labels` (None: a host not there),
        last_check left out: None for nothing. `port`: NODE_EXPORTER_PORT."""
        if labels is None or self.kind == "discovery":
            return None
        if self.kind == "consul":
            return consul_shows(self, hostname, labels)
        found = self.matching(labels)
        if self.kind == "all":
            return found
        if not found:
            return None
        if self.kind == "resolve":
            return True
        if self.kind == "prometheus":
            return prometheus_group(self.name, Packet(hostname, found), port)
        return found

    def triggers(self) -> tuple[frozenset[str], tuple[str, ...], bool]:
        """What can touch the answer: (these labels, labels with these prefixes, any
        change), as matching() reads them. The registry's changes are matched to
        answers by label, not answer by answer."""
        if self.kind == "consul":  # a host's address and metadata come from any label
            return frozenset(), (), True
        return frozenset(self.labels), self.prefixes, self.kind == "all"


ALL = View("all")
LOCAL = View("discovery")


def select_packets(view: View, packets: Iterable[Packet]) -> list[Packet]:
    """The hosts `view` lists, each with the labels it shows (GET /v1/discoveries)."""
    if view.kind == "all":
        return list(packets)
    matching = view.matching
    return [Packet(packet.hostname, shown, packet.last_check) for packet in packets
            if (shown := matching(packet.labels))]


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


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
        elif PROM_LABEL_RE.fullmatch(key) and not key.startswith("__") and key != "job":
            labels[key] = value  # __scheme__, __metrics_path__, job: the scraper's, not a host's
    if not found:
        return None
    targets = [with_port(host, port) for host in (hosts or [packet.hostname])]
    return {"Targets": targets, "Labels": dict(sorted(labels.items()))}


# The service model: what a host offers, read off its labels. One model for every view
# of services (Consul's catalog API, DNS, the page); pure, so each caches it its own way
# (per host labels: the labels tuple is the key).

#: node metadata keys: a label KEY:VALUE with such a KEY, other than these
NODE_META_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
NOT_NODE_META = frozenset({"service", "prometheus", "address"})
#: where a host's address comes from, first found wins
ADDRESS_KEYS = ("address:", "public_ip4:", "public_ip6:")


class Service(NamedTuple):
    """One instance of a service, on one host."""

    name: str
    port: int  #: 0: none given
    address: str  #: service:NAME:address, or "" for the host's address (Consul's way)
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str], ...]  #: (key, value) in label order, a key once


def host_address(hostname: str, labels: Iterable[str]) -> str:
    """The host's address: its label address:A, else public_ip4:A, else public_ip6:A,
    else its hostname (the first of each kind in sorted label order)."""
    found: dict[str, str] = {}
    for label in sorted(labels):
        if label.startswith(ADDRESS_KEYS):
            key, _, value = label.partition(":")
            if value:
                found.setdefault(key, value)
    for key in ADDRESS_KEYS:
        if key[:-1] in found:
            return found[key[:-1]]
    return hostname


def node_meta(labels: Iterable[str]) -> dict[str, str]:
    """The host's metadata: KEY -> VALUE for every label KEY:VALUE whose KEY is a plain
    word other than service, prometheus and address; the first in sorted order wins."""
    meta: dict[str, str] = {}
    for label in sorted(labels):
        key, sep, value = label.partition(":")
        if sep and key not in meta and key not in NOT_NODE_META \
                and NODE_META_KEY_RE.fullmatch(key):
            meta[key] = value
    return meta


def host_services(labels: Iterable[str]) -> tuple[Service, ...]:
    """The services a host offers (a label service:NAME each), sorted by name, with
    what its service:NAME:KEY:VALUE labels say of them: port (1-65535, else 0; the
    first valid one in sorted order), address, tags (in label order) and meta."""
    labels = tuple(labels)
    names = sorted({label[8:] for label in labels
                    if label.startswith("service:") and ":" not in label[8:] and label[8:]})
    if not names:
        return ()
    ports: dict[str, int] = {}
    addresses: dict[str, str] = {}
    tags: dict[str, list[str]] = {name: [] for name in names}
    meta: dict[str, dict[str, str]] = {name: {} for name in names}
    for label in labels:
        if not label.startswith("service:"):
            continue
        name, sep, rest = label[8:].partition(":")
        if not sep or name not in tags:
            continue
        key, sep, value = rest.partition(":")
        if not sep:
            continue
        if key == "tag":
            if value not in tags[name]:
                tags[name].append(value)
        elif key == "meta":
            meta_key, sep, meta_value = value.partition(":")
            if sep and meta_key:
                meta[name].setdefault(meta_key, meta_value)
    for label in sorted(labels):
        name, _, rest = label[8:].partition(":")
        if not label.startswith("service:") or name not in tags:
            continue
        key, _, value = rest.partition(":")
        if key == "port" and name not in ports and PORT_RE.fullmatch(value) \
                and 0 < int(value) < 65536:
            ports[name] = int(value)
        elif key == "address" and value and name not in addresses:
            addresses[name] = value
    return tuple(Service(name, ports.get(name, 0), addresses.get(name, ""),
                         tuple(tags[name]), tuple(meta[name].items())) for name in names)


# Consul's catalog API (SPEC 13) as views of the service model. A View of kind "consul"
# holds its query in the fields: `name` the route (one of CONSUL_ROUTES), `labels` its
# argument (a service or node name; for "nothing", the empty answer's JSON), `prefixes`
# its filters ("tag:T", "node-meta:K:V"). Its answer shows no last_check.

#: the routes a consul view may name; the node and service ones take an argument
CONSUL_ROUTES = frozenset({
    "services", "service", "health", "service-checks", "nodes", "node", "node-checks",
    "checks", "datacenters", "nothing"})
#: routes whose answer unites every host's part (see consul_united())
CONSUL_UNITED = ("services",)
#: routes whose answer is about the hosts offering the service `labels[0]`
CONSUL_SERVICE_ROUTES = ("service", "health", "service-checks")


class ConsulNode(NamedTuple):
    """What Consul's answers show of one host, read off its labels (the service model)."""

    address: str  #: host_address(), or "" for the hostname itself
    meta: tuple[tuple[str, str], ...]
    services: tuple[Service, ...]


def consul_node(labels: tuple[str, ...]) -> ConsulNode:
    return ConsulNode(host_address("", labels), tuple(node_meta(labels).items()),
                      host_services(labels))


def consul_view(route: str, argument: str = "", tags: Iterable[str] = (),
                meta: Iterable[str] = ()) -> View:
    """The view of a Consul route; `tags` all must match, as must `meta` (K:V each)."""
    filters = sorted({f"tag:{tag}" for tag in tags} | {f"node-meta:{pair}" for pair in meta})
    return View("consul", (argument,), tuple(filters), route)


def consul_filters(view: View) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(the tags an instance must all have, the node metadata a host must all have)."""
    tags, meta = [], []
    for item in view.prefixes:
        kind, _, value = item.partition(":")
        if kind == "tag":
            tags.append(value)
        else:
            key, _, meta_value = value.partition(":")
            meta.append((key, meta_value))
    return tuple(tags), tuple(meta)


def consul_united(view: View, shown: Any) -> tuple[Any, ...]:
    """What a host adds to an answer that unites every host's part (of the consul views,
    catalog/services: each service name and tag), else (): the watchers count these, so
    such an answer's index moves only when one appears or goes from the whole fleet."""
    if shown is None or view.kind != "consul" or view.name not in CONSUL_UNITED:
        return ()
    return tuple(key for name, tags in shown for key in ((name, None), *((name, tag)
                                                                     for tag in tags)))


def consul_shows(view: View, hostname: str, labels: tuple[str, ...],
                 node_of: Callable[[tuple[str, ...]], ConsulNode] = consul_node) -> Any:
    """What a consul view's answer shows of a host carrying `labels` (None: nothing),
    no more: the watchers diff it, the renderers draw it. `node_of`: consul_node, or
    a cache of it."""
    route, argument = view.name, view.labels[0]
    if route in CONSUL_SERVICE_ROUTES:
        if f"service:{argument}" not in labels:  # the common case: no work
            return None
    elif route in ("node", "node-checks"):
        if hostname != argument:
            return None
    elif route in ("datacenters", "nothing"):
        return None
    node = node_of(labels)
    tags, meta = consul_filters(view) if view.prefixes else ((), ())
    if meta and not all(pair in node.meta for pair in meta):
        return None
    if route in CONSUL_SERVICE_ROUTES:
        service = next((found for found in node.services if found.name == argument), None)
        if service is None or not all(tag in service.tags for tag in tags):
            return None
        return (service.name, service.tags) if route == "service-checks" else (node, service)
    if route == "services":  # its answer is names and tags alone
        return tuple((service.name, service.tags) for service in node.services) or None
    if route == "nodes":
        return node.address, node.meta
    if route in ("checks", "node-checks"):  # a check names its node, service and tags
        return tuple((service.name, service.tags) for service in node.services)
    return node


###############################################################################
# Renderers: the JSON text of answers, each host's block kept while it stays.
# Byte for byte what json.dumps(indent=2) gives (Consul's shapes: compact, as Consul
# sends them); no state but their own blocks.
###############################################################################


def render_json(value: Any) -> bytes:
    """Pretty JSON like the Go daemon's (2-space indent, trailing newline)."""
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


#: a str as a JSON string, like json.dumps(s, ensure_ascii=False) without its overhead
json_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]

#: label lists whose JSON text is kept (at least: RegistryRenderer raises it with the fleet)
LABEL_BLOCKS = 4096


def packet_block(packet: Packet, label_blocks: BoundedCache) -> bytes:
    """One packet as it stands in a pretty-printed list; label lists kept."""
    labels = label_blocks.get(packet.labels)
    if labels is None:
        items = ",\n".join(f"      {json_string(label)}" for label in packet.labels)
        labels = f"[\n{items}\n    ]" if items else "[]"
        label_blocks.put(packet.labels, labels)
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


#: hosts per kept chunk of the whole-registry answer: small enough that a few label
#: changes re-render little, big enough that finding them costs little
RENDER_CHUNK = 32


class RegistryRenderer:
    """The whole registry as GET /v1/discoveries lists it, equal to BlockRenderer's.

    The hot answer: rebuilt every second (last_check) and, under label churn, for
    nearly every request. It is kept in chunks of RENDER_CHUNK hosts, each host's
    block up to its last_check kept while its labels stay.

    Once per second (and whenever hosts came or went) a full look finds the chunks
    whose hosts changed by comparing lists of the registry's entries (a changed host
    has a new (labels, received) tuple; the comparison runs at C speed and stops at
    identical objects). Within the second, only the chunks of hosts the registry
    noted (labels changed) are rendered again: keep-alives change last_check alone,
    which an answer shows as of its second, as the answer cache does anyway.
    """

    def __init__(self, label_blocks: BoundedCache | None = None):
        self.label_blocks = BoundedCache(LABEL_BLOCKS) if label_blocks is None \
            else label_blocks
        #: host -> (labels, its block up to last_check): bounded by the fleet's size
        self.heads = BoundedCache(64)
        #: what the chunks show: hostnames, and each host's (labels, received)
        self._names: list[str] = []
        self._entries: tuple[tuple[tuple[str, ...], float], ...] = ()
        self._chunks: list[bytes] = []  # each ends in ",\n"
        self._getter: tuple[list[str] | None, Callable[[Any], Any]] = (None, tuple)
        self._second = -1  #: of the last full look
        self._noted = 0  #: the place in registry.noted up to which the chunks show it
        self._positions: tuple[list[str] | None, dict[str, int]] = (None, {})

    def render(self, registry: Registry, second: int = -1) -> bytes:
        return b"".join(self.render_parts(registry, second))

    def render_parts(self, registry: Registry, second: int = -1) -> list[bytes]:
        """The answer in pieces (for a vectored write): their join is render()'s.
        `second`: now's; -1 for a full look every time."""
        order = registry.order()
        if not order:
            return [b"[]\n"]
        noted = registry.noted.since(self._noted)
        if second != self._second or second < 0 or order is not self._names or noted is None:
            self._look(registry, order)
            self._second = second
        else:
            self._render_noted(registry, noted)
        self._noted = registry.noted.end
        chunks = self._chunks
        return [b"[\n", *chunks[:-1], chunks[-1][:-2] + b"\n]\n"]

    def _render_noted(self, registry: Registry, names: list[str]) -> None:
        """Render again the chunks of `names` (hosts that are all still there)."""
        order, hosts = self._names, registry.hosts
        if self._positions[0] is not order:
            self._positions = (order, {name: i for i, name in enumerate(order)})
        positions = self._positions[1]
        for number in {positions[name] // RENDER_CHUNK for name in names}:
            start = number * RENDER_CHUNK
            part = order[start:start + RENDER_CHUNK]
            self._chunks[number] = self._chunk(part, [hosts[name] for name in part])

    def _look(self, registry: Registry, order: list[str]) -> None:
        """Render again every chunk whose hosts or their entries changed."""
        hosts = registry.hosts
        # the kept blocks follow the fleet's size: when full, they are forgotten at
        # once (the hosts that went with them), and made again as hosts are rendered
        self.heads.max_entries = len(order) + len(order) // 2 + 64
        self.label_blocks.max_entries = max(LABEL_BLOCKS, 2 * len(order) + 1024)
        entries = self._entries_of(order, hosts)
        names, old = self._names, self._entries
        same_names = order is names or order == names
        chunks = self._chunks
        del chunks[math.ceil(len(order) / RENDER_CHUNK):]  # a shrunk registry: fewer chunks
        for number, start in enumerate(range(0, len(order), RENDER_CHUNK)):
            end = start + RENDER_CHUNK
            if number < len(chunks) and entries[start:end] == old[start:end] and \
                    (same_names or order[start:end] == names[start:end]):
                continue
            chunk = self._chunk(order[start:end], entries[start:end])
            if number < len(chunks):
                chunks[number] = chunk
            else:
                chunks.append(chunk)
        self._names, self._entries = order, entries

    def _entries_of(self, order: list[str], hosts: Mapping[str, tuple[tuple[str, ...], float]]
                    ) -> tuple[tuple[tuple[str, ...], float], ...]:
        """Each host's (labels, received) in `order`: an itemgetter of every name, made
        once per membership, looks them up at half the cost of a map()."""
        if len(order) < 2:  # an itemgetter of one name returns its value, not a tuple
            return tuple(map(hosts.__getitem__, order))
        if self._getter[0] is not order:
            self._getter = (order, operator.itemgetter(*order))
        return self._getter[1](hosts)

    def _chunk(self, names: list[str], entries: Sequence[tuple[tuple[str, ...], float]]
               ) -> bytes:
        heads = self.heads
        parts = []
        for name, (labels, received) in zip(names, entries):
            head = heads.get(name)
            if head is None or head[0] != labels:
                block = packet_block(Packet(name, labels, 0), self.label_blocks)
                head = (labels, block[:-len(b"0\n  }")])
                heads.put(name, head)
            parts.append(head[1])
            parts.append(b"%d\n  },\n" % received)
        return b"".join(parts)


# Consul's shapes (SPEC 13): compact JSON, as Consul sends it. Every host is a node
# whose ID is a UUID made from its hostname; every live host passes its node check
# (serfHealth), and every instance passes one service check.

CONSUL_PASSING = "passing"


def consul_compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def consul_node_id(hostname: str) -> str:
    """A stable UUID for a host (Consul's Node.ID): the same on every lobbyd."""
    import uuid  # here: only the Consul views need it (0.2 MB)

    return str(uuid.uuid5(uuid.NAMESPACE_DNS, hostname))


def consul_node_json(hostname: str, node: ConsulNode, datacenter: str) -> dict[str, Any]:
    address = node.address or hostname
    return {"ID": consul_node_id(hostname), "Node": hostname, "Address": address,
            "Datacenter": datacenter, "TaggedAddresses": {"lan": address, "wan": address},
            "Meta": dict(node.meta)}


def consul_service_json(service: Service) -> dict[str, Any]:
    """A service instance as Consul's agent and health endpoints show it."""
    return {"ID": service.name, "Service": service.name, "Tags": list(service.tags),
            "Address": service.address, "Meta": dict(service.meta), "Port": service.port,
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False}


def consul_catalog_service(hostname: str, node: ConsulNode, service: Service,
                           datacenter: str) -> dict[str, Any]:
    """One entry of GET /v1/catalog/service/NAME."""
    found = consul_node_json(hostname, node, datacenter)
    return {"ID": found["ID"], "Node": hostname, "Address": found["Address"],
            "Datacenter": datacenter, "TaggedAddresses": found["TaggedAddresses"],
            "NodeMeta": found["Meta"], "ServiceKind": "", "ServiceID": service.name,
            "ServiceName": service.name, "ServiceTags": list(service.tags),
            "ServiceAddress": service.address, "ServiceWeights": {"Passing": 1, "Warning": 1},
            "ServiceMeta": dict(service.meta), "ServicePort": service.port,
            "ServiceEnableTagOverride": False}


def consul_checks(hostname: str, services: Iterable[tuple[str, tuple[str, ...]]],
                  node_check: bool = True) -> list[dict[str, Any]]:
    """A host's checks: its node check, then one per service instance (name, tags)."""
    checks = [{"Node": hostname, "CheckID": "serfHealth", "Name": "Serf Health Status",
               "Status": CONSUL_PASSING, "Notes": "", "Output": "Agent alive and reachable",
               "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": ""}
              ] if node_check else []
    checks += [{"Node": hostname, "CheckID": f"service:{name}", "Name": f"Service '{name}' check",
                "Status": CONSUL_PASSING, "Notes": "", "Output": "", "ServiceID": name,
                "ServiceName": name, "ServiceTags": list(tags), "Type": ""}
               for name, tags in services]
    return checks


class ConsulRenderer:
    """The body of a consul view: each host's block kept while its labels stay (the
    caller's BlockRenderer), each label list's ConsulNode kept too."""

    def __init__(self, datacenter: str):
        self.datacenter = datacenter
        #: label list -> its ConsulNode (at least: render() raises it with the fleet)
        self.nodes = BoundedCache(LABEL_BLOCKS)

    def node(self, labels: tuple[str, ...]) -> ConsulNode:
        found = self.nodes.get(labels)
        if found is None:
            found = consul_node(labels)
            self.nodes.put(labels, found)
        return found

    def block(self, view: View, packet: Packet) -> bytes | None:
        """A host's part of a list answer (several items for the checks), or None."""
        shown = consul_shows(view, packet.hostname, packet.labels, self.node)
        if shown is None:
            return None
        hostname, route, datacenter = packet.hostname, view.name, self.datacenter
        if route == "service":
            return consul_compact(consul_catalog_service(hostname, *shown, datacenter))
        if route == "health":
            node, service = shown
            return consul_compact({
                "Node": consul_node_json(hostname, node, datacenter),
                "Service": consul_service_json(service),
                "Checks": consul_checks(hostname, [(service.name, service.tags)])})
        if route == "nodes":
            return consul_compact(consul_node_json(hostname, ConsulNode(*shown, ()),
                                                   datacenter))
        checks = consul_checks(hostname, [shown] if route == "service-checks" else shown,
                               node_check=route != "service-checks")
        return consul_compact(checks)[1:-1]  # items of the answer's list

    def render(self, view: View, registry: Registry, blocks: BlockRenderer) -> bytes:
        """The body of `view` now (call the registry's expire() first)."""
        route, argument = view.name, view.labels[0]
        self.nodes.max_entries = max(LABEL_BLOCKS, 2 * len(registry) + 1024)
        if route == "nothing":
            return argument.encode() + b"\n"
        if route == "datacenters":
            return consul_compact([self.datacenter]) + b"\n"
        if route == "node":
            entry = registry.hosts.get(argument)
            node = None if entry is None else consul_shows(view, argument, entry[0], self.node)
            if node is None:
                return b"null\n"
            return consul_compact({
                "Node": consul_node_json(argument, node, self.datacenter),
                "Services": {service.name: consul_service_json(service)
                             for service in node.services}}) + b"\n"
        if route == "services":
            tags: dict[str, set[str]] = {}
            for hostname, (labels, _received) in registry.hosts.items():
                for name, its_tags in consul_shows(view, hostname, labels, self.node) or ():
                    tags.setdefault(name, set()).update(its_tags)
            return consul_compact({name: sorted(tags[name]) for name in sorted(tags)}) + b"\n"
        if route in CONSUL_SERVICE_ROUTES:
            return blocks.render(registry.packets(having=(f"service:{argument}",)))
        if route == "node-checks":
            entry = registry.hosts.get(argument)
            return blocks.render([] if entry is None else [Packet(argument, entry[0])])
        return blocks.render(registry.packets())



###############################################################################
# Answers: which bytes a request for a View gets, and how they are sent. Owns the
# latest answer of each view (plain, and gzipped once asked for), the renderers and
# their one label-block cache, and the table of repeated request heads (answered
# without parse or handler while their answer is current).
###############################################################################

JSON_TYPE = "application/json; charset=UTF-8"
GZIP_HEADERS = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
GZIP_MIN = 1024  #: answers shorter than this go plain, whatever the client accepts
CACHED_VIEWS = 64  #: views whose latest answer is kept
RENDERERS = 32  #: views whose per-host blocks are kept
KNOWN_HEADS = 256  #: repeated request heads answered from their last answer ...
KNOWN_HEAD_BYTES = 2048  #: ... when they are no longer than this
IOV_MAX = 1024  #: pieces one writev() takes on Linux (sysconf SC_IOV_MAX)
#: views whose answers show no last_check: they change only with the registry
UNTIMED = ("resolve", "prometheus", "consul")


def consul_headers(index: int, stale: int = 0) -> dict[str, str]:
    """The headers of every answer of Consul's API: its index, a leader that is there, and
    how long ago it was heard (ms): 0, or while cut off from the fleet, since the cut."""
    return {"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": str(stale * 1000)}


def accepts_gzip(request: Request) -> bool:
    for item in request.headers.get("accept-encoding", "").split(","):
        token, _, params = item.strip().partition(";")
        if token.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def gzip_pieces(pieces: Iterable[bytes | memoryview]) -> bytes:
    """gzip of the pieces' join (level 5, no name, mtime 0), without joining them."""
    deflate = zlib.compressobj(5, zlib.DEFLATED, 31)  # 31: with a gzip header and trailer
    out = [deflate.compress(piece) for piece in pieces]
    out.append(deflate.flush())
    return b"".join(out)


class Prepared:
    """An answer ready to send as it is: its keep-alive head, then its body.

    The first request writes the pieces as rendered, gathered in one vectored write
    (an answer sent once, as under label churn, is never joined: 873 -> 63 us per
    answer at 10k hosts); from the second on, one joined buffer (a buffer costs the
    kernel a little less than three hundred). What the socket does not take at once
    goes in WRITE_SLICE slices, so a slow client never holds a multi-MB copy.
    Nothing changes once made; it goes when the last request sending it lets go.
    """

    __slots__ = ("_alone", "_data", "content_type", "head", "headers", "length", "parts",
                 "size", "status", "writes")

    def __init__(self, status: int, content_type: str, body: Sequence[bytes],
                 headers: Mapping[str, str], head_only: bool = False):
        self.status = status
        self.content_type = content_type
        self.headers = dict(headers)  #: the extra headers `head` carries
        self.length = sum(map(len, body))  #: of the body
        self.head = response_head(status, content_type, self.length, True, self.headers)
        self.parts = (self.head,) if head_only else (self.head, *body)  #: until joined
        self.size = len(self.head) if head_only else len(self.head) + self.length
        self._data: bytes | None = None
        self._alone: Prepared | None = None
        self.writes = 0  #: requests that wrote it

    @property
    def data(self) -> bytes:
        """Head and body in one piece, joined on first use."""
        if self._data is None:
            self._data = b"".join(self.parts)
            self.parts = (self._data,)
        return self._data

    def body(self) -> Sequence[bytes | memoryview]:
        """The body in pieces, without joining them."""
        if self._data is not None:
            return (memoryview(self._data)[len(self.head):],)
        return self.parts[1:]

    def head_alone(self) -> Prepared:
        """The same answer to a HEAD request: the head alone (made once)."""
        if self._alone is None:
            self._alone = Prepared(self.status, self.content_type, self.body(), self.headers,
                                   head_only=True)
        return self._alone

    def write_now(self, fd: int, offset: int = 0) -> int:
        """Write from `offset` what non-blocking `fd` takes at once (BlockingIOError if
        nothing): gathered the first time, from the joined copy after."""
        self.writes += 1
        if self.writes > 1 or self._data is not None or len(self.parts) > IOV_MAX:
            return os.write(fd, memoryview(self.data)[offset:])
        return os.writev(fd, self.parts[1:] if offset else self.parts)

    def rest(self, offset: int) -> memoryview:
        """What is left to send after `offset` bytes."""
        return memoryview(self.data)[offset:]


class CachedAnswer:
    """The latest answer of one view (plain, and gzipped once asked for), made at
    `stamp`; `headers` (the X-Lobby-Index the body was built at) are in its head."""

    __slots__ = ("_gzipped", "headers", "plain", "stamp")

    def __init__(self, stamp: tuple[int, ...], body: bytes | Sequence[bytes],
                 headers: Mapping[str, str]):
        self.stamp = stamp
        self.headers = dict(headers)
        self.plain = Prepared(200, JSON_TYPE, [body] if isinstance(body, bytes) else body,
                              headers)
        self._gzipped: Prepared | None = None

    def kept(self, gzipped: bool) -> Prepared | None:
        """The plain or the gzipped answer, if made already."""
        return self._gzipped if gzipped else self.plain

    def gzipped(self) -> Prepared:
        if self._gzipped is None:
            self._gzipped = Prepared(200, JSON_TYPE, [gzip_pieces(self.plain.body())],
                                     {**GZIP_HEADERS, **self.headers})
        return self._gzipped

    def restamped(self, stamp: tuple[int, ...], headers: Mapping[str, str]) -> CachedAnswer:
        """The same answer under another stamp and head (X-Lobby-Stale went on): the
        body, and its gzip if made, are not made again."""
        answer = CachedAnswer(stamp, self.plain.body(), headers)
        if self._gzipped is not None:
            answer._gzipped = Prepared(200, JSON_TYPE, self._gzipped.body(),
                                       {**GZIP_HEADERS, **answer.headers})
        return answer


class Repeat(NamedTuple):
    """A request head seen before: what it asked for, and what it got at `stamp`."""

    view: View
    stamp: tuple[int, ...]
    gzipped: bool
    head_only: bool
    headers: Mapping[str, str]  #: the request's (for the token, compared every time)


class Answers:
    """The answer of each View, built at most once per registry version (and second,
    for answers that show last_check), and the bytes it goes out as.

    An answer is exact for the registry version it is served at: a blocking query
    woken by a change gets a body that shows it (SPEC 8).
    """

    def __init__(self, registry: Registry, watchers: Watchers, expire: Callable[[], None],
                 port: int, datacenter: str = "lobby", cut: CutOff | None = None):
        self.registry = registry
        self.watchers = watchers
        self.expire = expire  #: drop the hosts gone silent (the daemon's: it logs them)
        self.port = port  #: NODE_EXPORTER_PORT, for Prometheus targets
        self.cut = cut or CutOff()  #: the Fleet's: while cut off, answers say how stale
        self._answers = BoundedCache(CACHED_VIEWS)  # view -> CachedAnswer
        self._renderers = BoundedCache(RENDERERS)  # view -> BlockRenderer
        self.label_blocks = BoundedCache(LABEL_BLOCKS)  # label list -> its JSON text
        self._all = RegistryRenderer(self.label_blocks)
        self.consul = ConsulRenderer(datacenter)
        #: request head (as read) -> Repeat: pollers repeat their head byte for byte
        self._repeats = BoundedCache(KNOWN_HEADS)

    def answer(self, request: Request, view: View, repeat: bool = True) -> Response:
        """The answer of `view` for `request` (gzipped if it asks); `repeat`: its head
        may be answered again without the handler while the answer is current."""
        return self.cached(request, view, lambda: self.render(view),
                           view.kind not in UNTIMED, repeat)

    def cached(self, request: Request, view: View, build: Callable[[], bytes | Sequence[bytes]],
               timed: bool = True, repeat: bool = True) -> Response:
        """The answer of `view` made by `build()` at most once per registry version (and
        second, if `timed`), carrying the view's X-Lobby-Index (SPEC 8), and while this
        lobbyd is cut off from the fleet, X-Lobby-Stale (SPEC 16)."""
        stamp = self.stamp(view, timed)
        answer = self._answers.get(view)
        if answer is None or answer.stamp != stamp:
            headers = consul_headers(stamp[2], stamp[3]) if view.kind == "consul" else \
                {"X-Lobby-Index": str(stamp[2])}
            if stamp[3]:
                headers["X-Lobby-Stale"] = str(stamp[3])
            if answer is not None and answer.stamp[:3] == stamp[:3]:
                answer = answer.restamped(stamp, headers)  # the same body, a staler head
            else:
                answer = CachedAnswer(stamp, build(), headers)
            self._answers.put(view, answer)
        gzipped = answer.plain.length >= GZIP_MIN and accepts_gzip(request)
        prepared = answer.gzipped() if gzipped else answer.plain
        if repeat:
            self._remember(request, view, stamp, gzipped)
        return Response(200, b"", JSON_TYPE, dict(prepared.headers), prepared=prepared)

    def stamp(self, view: View, timed: bool) -> tuple[int, int, int, int]:
        """What the answer of `view` is made from: (registry version, second, its index,
        seconds cut off: X-Lobby-Stale, 0 for none)."""
        self.expire()
        # the index before the body, with no await between: it describes that body.
        # It is in the stamp, for a view forgotten and made again gets a new index.
        index = self.watchers.index(view)
        stale = 0 if self.cut.since is None else self.cut.stale(time.time())
        return (self.registry.version, int(time.time()) if timed else 0, index, stale)

    def render(self, view: View) -> bytes | list[bytes]:
        """The body of `view`'s answer, now. Call expire() first."""
        registry = self.registry
        if view.kind == "all":  # the hot answer: a join of kept per-host blocks
            return self._all.render_parts(registry, int(time.time()))
        if view.kind == "resolve":
            return render_json(registry.carrying(view, time.time()))
        if view.kind == "prometheus":
            return self.renderer(view).render(registry.packets())
        if view.kind == "consul":
            return self.consul.render(view, registry, self.renderer(view))
        return self.renderer(view).render(
            select_packets(view, registry.packets(having=view.labels)))

    def renderer(self, view: View) -> BlockRenderer:
        """The block cache of one view: discoveries by labels or prefixes, a job, a list
        of Consul's API."""
        found = self._renderers.get(view)
        if found is None:
            if view.kind == "prometheus":
                port = self.port
                found = BlockRenderer(
                    lambda packet: group_block(view.shows(packet.hostname, packet.labels, port)),
                    key=lambda packet: packet.labels)
            elif view.kind == "consul":
                block = self.consul.block
                found = BlockRenderer(lambda packet: block(view, packet),
                                      key=lambda packet: packet.labels)
            else:
                found = BlockRenderer(lambda packet: packet_block(packet, self.label_blocks))
            self._renderers.put(view, found)
        return found

    def registry_json(self) -> bytes:
        """The whole registry as GET /v1/discoveries lists it (CALLBACK's input)."""
        self.expire()
        return self._all.render(self.registry)

    # repeated heads ------------------------------------------------------------
    def _remember(self, request: Request, view: View, stamp: tuple[int, ...],
                  gzipped: bool) -> None:
        """Answer the request's head again from this answer while it is current, if
        nothing but the head made the answer and the connection stays open."""
        head = request.head
        if not head or request.body or len(head) > KNOWN_HEAD_BYTES or \
                "expect" in request.headers or "transfer-encoding" in request.headers or \
                not wants_keep_alive(request):
            return  # the answer would skip a 100 Continue, or a body would be left unread
        self._repeats.put(head, Repeat(view, stamp, gzipped, request.method == "HEAD",
                                       request.headers))

    def repeated(self, head: bytes, most: float = math.inf
                 ) -> tuple[Prepared, Mapping[str, str]] | None:
        """What the request `head` got last time, with its headers, if that still is
        the answer and is no more than `most` bytes; else None (it goes the whole way).

        Runs from a connection's data_received: it looks, and changes nothing (no
        expiry, no watcher flush, no render): anything due sends the request the
        whole way, which does it.
        """
        repeat = self._repeats.get(head)
        if repeat is None:
            return None
        answer = self._answers.get(repeat.view)
        if answer is None or answer.stamp != repeat.stamp or \
                not self.current(repeat.view, repeat.stamp):
            return None
        prepared = answer.kept(repeat.gzipped)
        if prepared is None:
            return None
        if repeat.head_only:
            prepared = prepared.head_alone()
        return (prepared, repeat.headers) if prepared.size <= most else None

    def current(self, view: View, stamp: tuple[int, ...]) -> bool:
        """Whether an answer made at `stamp` is still the answer, without changing a
        thing: same registry version and second, no host due to expire, same index."""
        now = time.time()
        registry = self.registry
        return registry.version == stamp[0] and stamp[1] in (0, int(now)) and \
            now <= registry.next_expiry() and self.watchers.current(view) == stamp[2] and \
            (not stamp[3] if self.cut.since is None else stamp[3] == self.cut.stale(now))


###############################################################################
# Watchers: per-answer indexes, blocking queries and event streams (SPEC 8).
# The registry notes which hosts changed (a keep-alive is no change); each batch
# is matched to the watched answers by the labels a host gained or lost, then
# diffed exactly (View.shows), so it wakes exactly the watchers whose answer it
# touches. Owns each watched view's index, its held requests and its streams.
###############################################################################

EVENTS_TYPE = "text/event-stream; charset=UTF-8"
#: bytes an event stream may have queued for a client that does not read, over
#: what the kernel holds: past it the client is dropped, never slowing anyone
STREAM_BUFFER = 256 * 1024
STREAM_HEARTBEAT = 15.0
SNAPSHOTS = 16  #: first events of streams kept (per view, index, version and second)
#: answers whose index is tracked while nobody waits on them (most recently asked)
MAX_IDLE_VIEWS = 256
HOLD_SWEEP = 2.0

Changes = Mapping[str, tuple[Optional[tuple[str, ...]], str]]  # evaluated: no `|` on 3.9


def view_changes(view: View, changes: Changes, hosts: Mapping[str, list[Any]],
                 port: int, first_only: bool = False) -> list[tuple[str, str, Any]]:
    """(event, hostname, detail) for each host whose part of the answer changed.

    event is joined/changed (detail: the host's part) or left (detail: goodbye,
    expired, or unmatched when the host is still there but no longer matches).
    """
    found = []
    for hostname, (before_labels, left) in changes.items():
        entry = hosts.get(hostname)
        before = view.shows(hostname, before_labels, port)
        after = view.shows(hostname, None if entry is None else entry[0], port)
        if before == after:
            continue
        if before is None:
            found.append(("joined", hostname, after))
        elif after is None:
            found.append(("left", hostname, left if entry is None else "unmatched"))
        else:
            found.append(("changed", hostname, after))
        if first_only:
            break
    return found


def touched_views(changes: Changes, hosts: Mapping[str, list[Any]],
                  by_label: Mapping[str, set[View]],
                  by_prefix: Mapping[View, tuple[str, ...]],
                  everything: Iterable[View]
                  ) -> dict[View, dict[str, tuple[tuple[str, ...] | None, str]]]:
    """View -> the changes that may touch it (view_changes() then says exactly).

    Runs for every label change of the fleet: plain loops, no sets but the diff.
    """
    found: dict[View, dict[str, tuple[tuple[str, ...] | None, str]]] = {}
    every = tuple(everything)
    prefixed = tuple(by_prefix.items())
    any_prefix = tuple(prefix for _view, prefixes in prefixed for prefix in prefixes)
    watched = by_label.keys()
    for hostname, change in changes.items():
        before = change[0]
        entry = hosts.get(hostname)
        after = None if entry is None else entry[0]
        if before == after:
            continue  # changed and changed back
        for view in every:
            found.setdefault(view, {})[hostname] = change
        if not any_prefix and (before is None or watched.isdisjoint(before)) and \
                (after is None or watched.isdisjoint(after)):
            continue  # the common case: no watched label among them (C-speed test)
        diff: Iterable[str] = (after if before is None else before if after is None
                               else set(before).symmetric_difference(after))
        for label in diff:
            views = by_label.get(label)
            if views:
                for view in views:
                    found.setdefault(view, {})[hostname] = change
            if any_prefix and label.startswith(any_prefix):
                for view, prefixes in prefixed:
                    if label.startswith(prefixes):
                        found.setdefault(view, {})[hostname] = change
    return found


def sse_event(event: str, data: str, event_id: int | None = None) -> bytes:
    """One Server-Sent Event; every line of `data` gets its own data: field."""
    lines = [] if event_id is None else [f"id: {event_id}"]
    lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in data.replace("\r\n", "\n").split("\n")]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def sse_json(value: Any) -> str:
    """An event's data: JSON on one line."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def stream_events(changes: list[tuple[str, str, Any]], hosts: Mapping[str, list[Any]],
                  index: int) -> bytes:
    """The SSE text of one batch of changes to a discoveries answer."""
    out = []
    for event, hostname, detail in changes:
        if event == "left":
            data = {"hostname": hostname, "reason": detail}
        else:
            data = Packet(hostname, detail, int(hosts[hostname][1])).to_json()
        out.append(sse_event(event, sse_json(data), index))
    return b"".join(out)


class Watched:
    """One watched view: its index, the requests held on it, the streams following it."""

    __slots__ = ("index", "streams", "united", "view", "waiters")

    def __init__(self, view: View, index: int):
        self.view = view
        self.index = index
        self.waiters: dict[asyncio.Future[None], asyncio.StreamReader | None] = {}
        #: stream -> bytes it may have waiting before it is dropped
        self.streams: dict[asyncio.StreamWriter, int] = {}
        #: for an answer that unites the hosts' parts: how many hosts add each key
        self.united: dict[Any, int] | None = None


class Watchers:
    """Indexes of answers, and who waits for them to change.

    An answer's index is the value of a counter (starting at the start time in
    ms, so a restarted daemon never reuses an old index) when its content last
    changed. Views are watched on demand; an idle view forgotten and asked for
    again gets a fresh index, which costs its client one early answer.
    """

    def __init__(self, registry: Registry, local: Callable[[], Packet],
                 expire: Callable[[], None], port: int):
        self.registry = registry
        self.local = local
        self.expire = expire
        self.port = port
        self.counter = time.time_ns() // 1_000_000
        self.views: dict[View, Watched] = {}  # most recently asked last
        self.by_label: dict[str, set[View]] = {}
        self.by_prefix: dict[View, tuple[str, ...]] = {}
        self.everything: set[View] = set()
        self._snapshots = BoundedCache(SNAPSHOTS)
        self._local_seen: tuple[Any, ...] | None = None
        self._scheduled = False
        self._sweeping = False
        self.closed = False

    # change detection ------------------------------------------------------
    def poke(self) -> None:
        """The registry or the local labels changed: diff at the next loop turn."""
        if not self._scheduled:
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # no loop (tests): index() flushes
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Apply the changes noted since the last flush to every view."""
        self._scheduled = False
        changes = self.registry.take_changes()
        local_key = self.local()[:2]  # hostname, labels
        local_changed = self._local_seen is not None and local_key != self._local_seen
        self._local_seen = local_key
        if not changes and not local_changed:
            return
        # every change moves the counter, watched or not: a view watched later must
        # never get an index that an earlier view of other content had
        self.counter += 1
        hosts = self.registry.hosts
        candidates = touched_views(changes, hosts, self.by_label, self.by_prefix,
                                   self.everything)
        if local_changed and LOCAL in self.views:
            candidates[LOCAL] = {}
        for view, subset in candidates.items():
            watched = self.views[view]
            if watched.united is not None:
                touched: list[Any] = self.unite(watched, subset)
            else:
                touched = [True] if view == LOCAL else view_changes(
                    view, subset, hosts, self.port, first_only=not watched.streams)
            if not touched:
                continue
            watched.index = self.counter
            for waiter in watched.waiters:
                if not waiter.done():
                    waiter.set_result(None)
            watched.waiters.clear()
            if watched.streams:
                self.send(watched, stream_events(touched, hosts, watched.index))

    def unite(self, watched: Watched, changes: Changes) -> list[Any]:
        """Count the changes into an answer that unites the hosts' parts: [True] if a key
        appeared in the union or left it, else []."""
        view, counts, hosts, port = watched.view, watched.united, self.registry.hosts, self.port
        assert counts is not None
        present: dict[Any, bool] = {}
        for hostname, (before_labels, _left) in changes.items():
            entry = hosts.get(hostname)
            before = consul_united(view, view.shows(hostname, before_labels, port))
            after = consul_united(view, view.shows(hostname, entry and entry[0], port))
            if before == after:
                continue
            for key, step in [*((key, -1) for key in before), *((key, 1) for key in after)]:
                present.setdefault(key, key in counts)
                counts[key] = counts.get(key, 0) + step
                if not counts[key]:
                    del counts[key]
        return [True] if any((key in counts) != was for key, was in present.items()) else []

    def _flush_pending(self) -> None:
        # a change of the local labels or hostname pokes too: no need to look at them
        if self._scheduled or self.registry.changes:
            self.flush()

    def watched(self, view: View) -> Watched:
        """The view's watch, up to date, made if new."""
        self._flush_pending()
        found = self.views.pop(view, None)
        if found is None:
            found = Watched(view, self.counter)
            self._forget_idle()
            if view == LOCAL and self._local_seen is None:
                self._local_seen = self.local()[:2]  # what a later flush compares with
            labels, prefixes, everything = view.triggers()
            for label in labels:
                self.by_label.setdefault(label, set()).add(view)
            if prefixes:
                self.by_prefix[view] = prefixes
            if everything:
                self.everything.add(view)
            if view.kind == "consul" and view.name in CONSUL_UNITED:
                found.united = {}
                for hostname, (labels, _received) in self.registry.hosts.items():
                    for key in consul_united(view, view.shows(hostname, labels, self.port)):
                        found.united[key] = found.united.get(key, 0) + 1
        self.views[view] = found  # last: the most recently asked
        return found

    def index(self, view: View) -> int:
        return self.watched(view).index

    def current(self, view: View) -> int | None:
        """The view's index if it is watched and no change waits to be applied; else
        None. Changes nothing (see Answers.repeated)."""
        if self._scheduled or self.registry.changes:
            return None
        found = self.views.get(view)
        return None if found is None else found.index

    def _forget_idle(self) -> None:
        idle = [view for view, watched in self.views.items()
                if not watched.waiters and not watched.streams]
        for view in idle[:max(0, len(idle) - MAX_IDLE_VIEWS + 1)]:
            del self.views[view]
            for label in view.triggers()[0]:
                self.by_label[label].discard(view)
                if not self.by_label[label]:
                    del self.by_label[label]
            self.by_prefix.pop(view, None)
            self.everything.discard(view)

    # blocking queries -------------------------------------------------------
    async def hold(self, view: View, index: int, wait: float,
                   reader: asyncio.StreamReader | None) -> None:
        """Return when the answer's index is no longer `index`, after `wait`
        seconds, when the client leaves, or at shutdown."""
        self.expire()
        watched = self.watched(view)
        if watched.index != index or self.closed:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        watched.waiters[waiter] = reader
        if not self._sweeping:
            self._sweeping = True
            loop.call_later(HOLD_SWEEP, self._sweep)
        try:
            with deadline(wait, lambda: waiter.done() or waiter.set_result(None)):
                await waiter
        finally:
            watched.waiters.pop(waiter, None)

    def _sweep(self) -> None:
        """Release requests whose client has gone: their connections count."""
        waiting = False
        for watched in self.views.values():
            for waiter, reader in list(watched.waiters.items()):
                if reader is not None and reader.at_eof() and not waiter.done():
                    waiter.set_result(None)
                waiting = True
        self._sweeping = waiting and not self.closed
        if self._sweeping:
            asyncio.get_running_loop().call_later(HOLD_SWEEP, self._sweep)

    # event streams ------------------------------------------------------------
    async def stream(self, view: View, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, headers: Mapping[str, str] = {}) -> None:
        """GET /v1/events: the head (with `headers`), a snapshot, then the changes until
        the client leaves."""
        self.expire()
        watched = self.watched(view)
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(("HTTP/1.1 200 OK\r\nContent-Type: " + EVENTS_TYPE + "\r\n"
                      "Cache-Control: no-cache\r\nConnection: close\r\n" + extra +
                      f"X-Lobby-Index: {watched.index}\r\n\r\n").encode("latin-1"))
        snapshot = self.snapshot(watched)
        writer.write(snapshot)
        if self.closed:
            return
        # no await since the snapshot: no change is missed. Until the snapshot is
        # read, a big one must not count against the client.
        watched.streams[writer] = len(snapshot) + STREAM_BUFFER
        loop = asyncio.get_running_loop()
        heartbeat = loop.call_later(STREAM_HEARTBEAT, self._heartbeat, watched, writer)
        try:
            with deadline(WRITE_TIMEOUT, writer.transport.abort):
                await writer.drain()
            if writer in watched.streams:
                watched.streams[writer] = STREAM_BUFFER
            while await reader.read(4096):
                pass  # the client has nothing to say; EOF or an abort ends the stream
        finally:
            watched.streams.pop(writer, None)
            heartbeat.cancel()

    def snapshot(self, watched: Watched) -> bytes:
        """The first event of a stream; built once per answer and second, like GETs."""
        key = (watched.view, watched.index, self.registry.version, int(time.time()))
        found = self._snapshots.get(key)
        if found is None:
            view = watched.view
            packets = select_packets(view, self.registry.packets(having=view.labels))
            found = sse_event("snapshot", sse_json([p.to_json() for p in packets]),
                              watched.index)
            self._snapshots.put(key, found)
        return found

    def _heartbeat(self, watched: Watched, writer: asyncio.StreamWriter) -> None:
        if writer in watched.streams:
            self.send_to(writer, b": keep-alive\n\n", watched.streams[writer])
            asyncio.get_running_loop().call_later(STREAM_HEARTBEAT, self._heartbeat, watched,
                                                  writer)

    def send(self, watched: Watched, data: bytes) -> None:
        for writer, allowance in list(watched.streams.items()):
            self.send_to(writer, data, allowance)

    @staticmethod
    def send_to(writer: asyncio.StreamWriter, data: bytes, allowance: int) -> None:
        """Queue without waiting; a client that lets `allowance` bytes pile up is dropped."""
        transport = writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > allowance:
            log.info("event stream: the client reads too slowly, dropped")
            transport.abort()
            return
        transport.write(data)

    def close(self) -> None:
        """Shutdown: answer every held request and end every stream, now."""
        self.closed = True
        for watched in self.views.values():
            for waiter in watched.waiters:
                if not waiter.done():
                    waiter.set_result(None)
            for writer in list(watched.streams):
                writer.transport.abort()


###############################################################################
# HTTP messages: requests parsed with limits on everything, responses and their
# heads, and the Accept header's negotiation. Pure: no socket, no state.
###############################################################################

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 20
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
BODY_TIMEOUT = 60.0
WRITE_TIMEOUT = 60.0
WRITE_SLICE = 1 << 20
SLICE_MIN = 64 * 1024  #: bodies this big (not prepared) go out in WRITE_SLICE slices
MAX_CONNECTIONS = 1000
#: past the limits, connections for RESERVED_PATHS (health, metrics) only: one request
#: each, its head within RESERVED_HEAD_TIMEOUT (out of the fds kept below the limit)
RESERVED_CONNECTIONS = 16
RESERVED_HEAD_TIMEOUT = 2.0
LISTEN_BACKLOG = 128
TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: ASCII controls but tab, CR and LF (those end lines, checked there): in no request head
HEAD_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_TRAILER_BYTES = 8 * 1024  #: a chunked body's trailers, all of them
REASONS = {200: "OK", 100: "Continue", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required", 413: "Content Too Large", 421: "Misdirected Request", 431:
           "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable",
           505: "HTTP Version Not Supported", 507: "Insufficient Storage"}
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
    #: the connection's reader: a held request watches it for the client leaving
    reader: asyncio.StreamReader | None = None
    head: bytes = b""  #: the request head as read, its blank line included

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    #: when set, the whole answer (keep-alive head and body) ready to send: `body` empty
    prepared: Prepared | None = None
    #: a body without end (an event stream): writes its own head, then owns the connection
    stream: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None

    @property
    def length(self) -> int:
        return self.prepared.length if self.prepared else len(self.body)

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
    if HEAD_CONTROL_RE.search(text):
        raise HttpError(400, "control character in the request head")
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
        if encoding.lower() != "chunked":  # exactly: only SP and HTAB were stripped
            raise HttpError(501, f"unsupported Transfer-Encoding {show(encoding)}")
        if "content-length" in request.headers:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        return None
    raw = request.headers.get("content-length")
    if raw is None:
        return 0
    if not re.fullmatch(r"[0-9]{1,18}", raw):  # ASCII digits: str.isdigit() takes "²"
        raise HttpError(400, f"bad Content-Length {show(raw)}")
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise HttpError(413, f"body over {MAX_BODY_BYTES} bytes")
    return length


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text, ext, _ = line[:-2].partition(b";")
        if ext:  # white space only before an extension
            size_text = size_text.rstrip(b" \t")
        if not re.fullmatch(rb"[0-9a-fA-F]{1,8}", size_text):
            raise HttpError(400, "bad chunk size")
        size = int(size_text, 16)
        if len(body) + size > MAX_BODY_BYTES:
            raise HttpError(413, f"body over {MAX_BODY_BYTES} bytes")
        if size == 0:
            trailers = 0
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                trailers += len(line)  # trailers: ignored, but not without end
                if trailers > MAX_TRAILER_BYTES:
                    raise HttpError(431, f"trailers over {MAX_TRAILER_BYTES} bytes")
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


def accept_ranges(accept: str) -> list[tuple[str, float]]:
    """The media ranges of an Accept header with their q; a bad q counts as 0."""
    ranges = []
    for item in accept.split(","):
        media, *params = item.split(";")
        media = media.strip().lower()
        if "/" not in media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:  # also NaN
                    q = 0.0
        ranges.append((media, q))
    return ranges


def accept_quality(ranges: Sequence[tuple[str, float]], media: str) -> float:
    """The q an Accept header gives `media`: the most specific matching range decides."""
    kind = media.split("/")[0] + "/*"
    best, best_rank = 0.0, 0
    for candidate, q in ranges:
        rank = 3 if candidate == media else 2 if candidate == kind else \
            1 if candidate == "*/*" else 0
        if rank > best_rank or (rank == best_rank and rank and q > best):
            best, best_rank = q, rank
    return best


def prefers_html(accept: str) -> bool:
    """Whether an Accept header ranks text/html strictly above application/json.

    A tie keeps JSON: no header, `*/*`, or both at the same q get what GET / always
    answered. Browsers send `text/html,...,*/*;q=0.8`; curl `*/*`; scripts, Prometheus
    and the lobby clients nothing or `application/json`.
    """
    if "html" not in accept.lower():  # nearly every client: the short way out
        return False
    ranges = accept_ranges(accept)
    return accept_quality(ranges, "text/html") > accept_quality(ranges, "application/json")


###############################################################################
# HTTP server: HTTP/1.1 on asyncio streams. Generic: it parses a request, calls one
# handler (and, for a head seen before, one optional `at_once` callable), and writes
# the answer; it knows no route, type or registry. Owns its connections and the
# count of answers by status (for /metrics).
###############################################################################


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
    """Accepts connections, hands each parsed Request to `handle`, writes its Response.

    `at_once(head, most)`, if given, answers a request head seen before without the
    parse and the handler: it returns the Prepared keep-alive answer to send (at most
    `most` bytes), or None to send the request the whole way. It must change nothing:
    it also runs from a connection's data_received (HttpProtocol).

    Connections: at most `limit` in all and `per_address` from one client address. A
    new one past either first closes an idle keep-alive connection (of its address,
    else of the address holding most); if none is idle, it may take one of
    RESERVED_CONNECTIONS slots, answered only for `reserved_paths` (a health check
    gets through a flood), else it is closed at once.
    """

    def __init__(self, handle: Callable[[Request], Awaitable[Response]],
                 at_once: Callable[[bytes, float], Prepared | None] | None = None,
                 codes: dict[int, int] | None = None, per_address: int = MAX_CONNECTIONS,
                 reserved_paths: Iterable[str] = ()):
        self.handle = handle
        self.at_once = at_once
        self.limit = connection_limit()
        self.active = 0
        self.per_address = per_address
        #: client address -> its connections (admitted, not reserved), oldest first
        self.by_address: dict[str, dict[HttpProtocol, None]] = {}
        self.reserved_paths = frozenset(reserved_paths)
        self.reserved = 0  #: reserved slots in use
        #: status -> responses sent (for /metrics, where the caller keeps it)
        self.codes: dict[int, int] = {} if codes is None else codes
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.stopping = False  #: shutdown began: no new connection, no new request

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: HttpProtocol(self), host, port, backlog=LISTEN_BACKLOG)

    def stop_accepting(self) -> None:
        """Shutdown, first: no new connection, idle keep-alive connections closed, and
        a request read from now on answered 503; requests being answered finish. A
        client that comes back (the page, a blocking query) finds the port closed and
        keeps what it had, instead of an answer from a daemon whose own goodbye may
        already have dropped it from its registry."""
        self.stopping = True
        if self.server:
            self.server.close()
        for connections in list(self.by_address.values()):
            while self._close_idle(connections):
                pass

    async def close(self) -> None:
        self.stop_accepting()
        for writer in list(self.writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol: HttpProtocol = writer.transport.get_protocol()  # type: ignore[assignment]
        mine = self.by_address.get(protocol.address)
        if (self.active >= self.limit or (mine is not None and len(mine) >= self.per_address)) \
                and not self._make_room(protocol.address):
            await self._serve_reserved(reader, writer, protocol)
            return
        self.active += 1
        self.by_address.setdefault(protocol.address, {})[protocol] = None
        protocol.admitted = True
        self.writers.add(writer)
        # one deadline per connection, moved for each step (idle, head, body, write)
        timer = deadline(math.inf, writer.transport.abort)
        protocol.timer = timer
        try:
            first = True
            while await self._serve_one(reader, writer, timer, protocol, first) and \
                    not self.stopping:
                first = False
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, OSError):
            pass  # the client went away, stalled, or sent what cannot be answered
        finally:
            timer.cancel()
            self._release(protocol)
            self.writers.discard(writer)
            writer.close()

    def _release(self, protocol: HttpProtocol) -> None:
        """The connection no longer counts against the limits (once)."""
        if not protocol.admitted:
            return
        protocol.admitted = False
        self.active -= 1
        mine = self.by_address[protocol.address]
        del mine[protocol]
        if not mine:
            del self.by_address[protocol.address]

    def _make_room(self, address: str) -> bool:
        """Close idle keep-alive connections until a connection from `address` fits
        the limits; False if there are none to close."""
        mine = self.by_address.get(address)
        if mine is not None and len(mine) >= self.per_address and not self._close_idle(mine):
            return False
        if self.active >= self.limit:
            most = max(self.by_address.values(), key=len)
            if not self._close_idle(most) and not any(
                    self._close_idle(conns) for conns in list(self.by_address.values())):
                return False
        return True

    def _close_idle(self, connections: dict[HttpProtocol, None]) -> bool:
        """Close the oldest idle keep-alive connection of `connections`, if one is."""
        for protocol in connections:
            if protocol.idle and protocol.transport is not None:
                self._release(protocol)
                protocol.transport.close()  # what it was sent goes first; its task ends
                return True
        return False

    async def _serve_reserved(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              protocol: HttpProtocol) -> None:
        """Past the limits: one request for a reserved path answered, any other refused
        (503); or, with every reserved slot taken, closed at once."""
        if self.reserved >= RESERVED_CONNECTIONS or not self.reserved_paths:
            writer.close()  # costing the others nothing
            return
        self.reserved += 1
        self.writers.add(writer)
        timer = deadline(RESERVED_HEAD_TIMEOUT, writer.transport.abort)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            timer.move(math.inf)
            request = parse_request_head(head[:-4].lstrip(b"\r\n"))
            request.head, request.reader = head, reader
            if request.path in self.reserved_paths and request.method in ("GET", "HEAD") \
                    and body_length(request) == 0:
                response = await self.handle(request)
            else:
                response = Response.text(503, "too many connections: only "
                                         f"{', '.join(sorted(self.reserved_paths))} answered "
                                         "now; try again later", {"Retry-After": "1"})
            await self._write(writer, response, False, request.method == "HEAD", timer,
                              protocol.fd)
        except (HttpError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, asyncio.TimeoutError, OSError):
            pass  # gone, stalled or garbled: a reserved slot waits for no one
        finally:
            timer.cancel()
            self.reserved -= 1
            self.writers.discard(writer)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         timer: deadline, protocol: HttpProtocol, first: bool) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            head = await self._read_head(reader, timer, protocol, first)
            if self.stopping:
                raise HttpError(503, "lobbyd is stopping")
            prepared = self.at_once(head, math.inf) if self.at_once is not None else None
            if prepared is not None:  # the answer it got last time still is the answer
                await self._send(writer, prepared, timer, protocol.fd)
                return True  # at_once gives keep-alive answers only
            request = await self._read_request(head, reader, writer, timer)
        except HttpError as exc:
            await self._write(writer, Response.text(exc.status, exc.message, exc.headers),
                              False, False, timer, protocol.fd)
            return False
        response = await self.handle(request)
        if response.stream is not None and request.method != "HEAD":
            await response.stream(reader, writer)
            return False
        # after a 500 the connection's state is suspect; a 503 (unhealthy) is an answer;
        # a refused client (403, 421) tries again on a new connection, if at all
        keep_alive = wants_keep_alive(request) and (response.status < 500 or
                                                    response.status == 503) and \
            response.status not in (403, 421) and not self.stopping  # a held one, woken
        await self._write(writer, response, keep_alive, request.method == "HEAD", timer,
                          protocol.fd)
        return keep_alive

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader, timer: deadline,
                         protocol: HttpProtocol, first: bool) -> bytes:
        """The request head as sent, its blank line included."""
        # A new connection must send all its headers within HEADER_TIMEOUT; a kept-
        # alive one may idle for IDLE_TIMEOUT, then has HEADER_TIMEOUT for the rest.
        started = b""
        if not first:
            timer.move(IDLE_TIMEOUT)
            # Idle only while suspended here: had a byte been buffered, readexactly
            # would return without letting data_received run in between.
            protocol.idle = True
            try:
                started = await reader.readexactly(1)
            finally:
                protocol.idle = False
        timer.move(HEADER_TIMEOUT)
        try:
            return started + await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HttpError(431, f"request headers over {MAX_HEADER_BYTES} bytes") from None
        finally:
            timer.move(math.inf)

    @staticmethod
    async def _read_request(head: bytes, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter, timer: deadline) -> Request:
        request = parse_request_head(head[:-4].lstrip(b"\r\n"))
        request.head = head
        request.reader = reader
        length = body_length(request)
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length != 0:  # most requests have no body
            timer.move(BODY_TIMEOUT)
            try:
                if length is None:
                    request.body = await read_chunked(reader)
                else:
                    request.body = await reader.readexactly(length)
            finally:
                timer.move(math.inf)
        return request

    def _count(self, status: int) -> None:
        self.codes[status] = self.codes.get(status, 0) + 1

    async def _write(self, writer: asyncio.StreamWriter, response: Response, keep_alive: bool,
                     head_only: bool, timer: deadline, fd: int) -> None:
        prepared = response.prepared
        if prepared is not None and keep_alive:
            await self._send(writer, prepared.head_alone() if head_only else prepared, timer,
                             fd)
            return
        self._count(response.status)
        head = response_head(response.status, response.content_type, response.length,
                             keep_alive, response.headers)
        body: bytes | memoryview = b"" if head_only else \
            prepared.rest(len(prepared.head)) if prepared is not None else response.body
        if len(body) < SLICE_MIN:
            writer.write(head + body)  # one write, one segment: a head alone wakes twice
            if writer.transport.get_write_buffer_size():  # else drain() has nothing to do
                await self._drain(writer, timer)
            return
        writer.write(head)
        await self._write_slices(writer, memoryview(body), timer)

    async def _send(self, writer: asyncio.StreamWriter, prepared: Prepared, timer: deadline,
                    fd: int) -> None:
        """A prepared answer: what the socket takes at once in one system call (often
        all of it, with no future), the rest in slices."""
        self._count(prepared.status)
        sent = 0
        if fd >= 0 and not writer.transport.get_write_buffer_size():
            with contextlib.suppress(BlockingIOError, InterruptedError):
                sent = prepared.write_now(fd)
            if sent == prepared.size:
                return
        await self._write_slices(writer, prepared.rest(sent), timer)

    @staticmethod
    async def _write_slices(writer: asyncio.StreamWriter, data: memoryview, timer: deadline
                            ) -> None:
        # In slices: a slow reader then holds one slice in its buffer, not a copy
        # of a multi-megabyte answer (a thousand of those are gigabytes).
        timer.move(WRITE_TIMEOUT)
        try:
            for start in range(0, len(data), WRITE_SLICE):
                writer.write(data[start:start + WRITE_SLICE])
                await writer.drain()
        finally:
            timer.move(math.inf)

    @staticmethod
    async def _drain(writer: asyncio.StreamWriter, timer: deadline) -> None:
        timer.move(WRITE_TIMEOUT)
        try:
            await writer.drain()
        finally:
            timer.move(math.inf)

    def answer_at_once(self, head: bytes, connection: HttpProtocol) -> bool:
        """Answer a repeated request head from data_received, if `at_once` has its
        answer and it goes out without waiting: True if it did.

        What the socket does not take at once waits in the transport (no more than
        WRITE_SLICE); the connection's next request then goes the whole way, whose
        write waits for it under WRITE_TIMEOUT.
        """
        transport = connection.transport
        if self.at_once is None or transport is None or transport.get_write_buffer_size():
            return False
        prepared = self.at_once(head, WRITE_SLICE)
        if prepared is None:
            return False
        try:
            sent = prepared.write_now(connection.fd)
        except OSError:  # none taken now (or a broken socket: the transport's to see)
            sent = 0
        if sent < prepared.size:
            transport.write(prepared.rest(sent))
        self._count(prepared.status)
        if connection.timer is not None:
            connection.timer.move(IDLE_TIMEOUT)  # it still waits for a request: from now on
        return True


class HttpProtocol(asyncio.StreamReaderProtocol):
    """One connection: its bytes go to a StreamReader, read by HttpServer._serve's task.

    But while that task waits for the next request with nothing buffered (`idle`), a
    request head the server has answered before, arriving whole, is answered right
    here (HttpServer.answer_at_once): a poller's request then costs no task wake-up,
    no coroutine and no future, only a lookup and a write.
    """

    def __init__(self, server: HttpServer):
        loop = asyncio.get_running_loop()
        super().__init__(asyncio.StreamReader(limit=MAX_HEADER_BYTES, loop=loop), server._serve,
                         loop=loop)
        self.server = server
        self.idle = False  #: set by the task while it waits, with nothing buffered
        self.timer: deadline | None = None  #: the task's, to move its idle deadline
        self.transport: asyncio.WriteTransport | None = None
        self.fd = -1
        self.address = ""  #: the client's IP address, for the per-address limit
        self.admitted = False  #: counted against the server's limits

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.idle and self.fd >= 0 and self.server.answer_at_once(data, self):
            return
        self.idle = False  # the task owns what follows: answered in order
        super().data_received(data)


###############################################################################
# Health and metrics: counters bumped where things happen, one pure renderer.
###############################################################################

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Counters:
    """What happened since start; plain attributes, bumped on the paths that exist anyway."""

    __slots__ = ("dropped", "dropped_full", "dropped_subject", "goodbyes", "his", "http_codes",
                 "impostors", "joined", "left_expired", "left_goodbye", "published",
                 "sync_refused")

    def __init__(self) -> None:
        self.his = self.goodbyes = self.dropped = self.published = 0
        self.dropped_subject = self.dropped_full = self.impostors = self.sync_refused = 0
        self.joined = self.left_goodbye = self.left_expired = 0
        self.http_codes: dict[int, int] = {}  #: status -> responses sent (the HTTP server)


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


class Health:
    """GET /v1/health, GET /metrics and systemd's STATUS line, read off the parts that
    own the state: it keeps nothing but the start time."""

    def __init__(self, registry: Registry, local: LocalHost, transports: Sequence[Transport],
                 counters: Counters, callback_runs: Mapping[str, int],
                 cut: CutOff | None = None):
        self.registry = registry
        self.local = local
        self.transports = transports
        self.counters = counters
        self.callback_runs = callback_runs  #: result -> CALLBACK runs (the runner's)
        self.cut = cut or CutOff()  #: the Fleet's
        self.started = time.time()
        self.dns: DnsServer | None = None  #: set by the Daemon when DNS_PORT is set

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, GET /v1/health): healthy while every transport is connected."""
        drivers = [transport.state() for transport in self.transports]
        healthy = all(driver["connected"] for driver in drivers)
        report = {
            "status": "ok" if healthy else "disconnected", "hostname": self.local.hostname,
            "version": __version__, "uptime_s": int(time.time() - self.started),
            "hosts": len(self.registry), "drivers": drivers,
            "checks": self.local.check_states(),
            **({"dns": self.dns.state()} if self.dns else {})}
        if self.cut.since is not None:  # the answers carry X-Lobby-Stale
            report["cut_off_since"] = int(self.cut.since)
        return healthy, report

    def families(self) -> list[Family]:
        """Every metric family of GET /metrics."""
        counters, transports, runs = self.counters, self.transports, self.callback_runs
        return [
            Family("lobbyd_build_info", "gauge", "lobbyd's version.",
                   [({"version": __version__}, 1)]),
            Family("lobbyd_hosts", "gauge", "Live hosts in the registry.",
                   [({}, len(self.registry))]),
            Family("lobbyd_local_labels", "gauge", "Labels this host publishes.",
                   [({}, len(self.local.labels))]),
            Family("lobbyd_connected", "gauge", "1 while the transport is connected.",
                   [({"driver": t.kind}, int(t.is_connected)) for t in transports]),
            Family("lobbyd_reconnects_total", "counter", "Reconnections after the first.",
                   [({"driver": t.kind}, t.reconnects) for t in transports]),
            Family("lobbyd_cut_off_seconds", "gauge",
                   "Seconds since every transport was lost (0 while one is connected).",
                   [({}, self.cut.stale(time.time()))]),
            Family("lobbyd_packets_received_total", "counter", "Valid discovery packets.",
                   [({"message": "hi"}, counters.his),
                    ({"message": "goodbye"}, counters.goodbyes)]),
            Family("lobbyd_packets_dropped_total", "counter",
                   "Packets dropped: off the contract, on another host's subject, or of a "
                   "new host while the registry is full.",
                   [({"reason": "invalid"}, counters.dropped),
                    ({"reason": "subject"}, counters.dropped_subject),
                    ({"reason": "registry_full"}, counters.dropped_full)]),
            Family("lobbyd_impostor_packets_total", "counter",
                   "Packets of others claiming this host's hostname (ignored).",
                   [({}, counters.impostors)]),
            Family("lobbyd_sync_answers_refused_total", "counter",
                   "Join requests not answered: too many at once.",
                   [({}, counters.sync_refused)]),
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
                    for code, count in sorted(counters.http_codes.items())]),
            Family("lobbyd_check_up", "gauge", "1 while the health check passes.",
                   [({"check": name}, int(state["up"]))
                    for name, state in self.local.check_states().items()]),
            *(self.dns.families() if self.dns else ()),
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
            return "; ".join(parts) + f"; {plural(len(self.registry), 'host')} known"
        if self.cut.since is not None:
            return "; ".join(parts) + "; cut off: the API serves the last known fleet " \
                f"({plural(len(self.registry), 'host')})"
        return "; ".join(parts) + "; the API keeps serving"


###############################################################################
# Request guard: which names a request may carry in Host (DNS rebinding: a page of
# evil.example whose name now points at 127.0.0.1), and which pages may change
# state (a cross-site form or fetch() speaking for the operator). Pure but for one
# look-up of the machine's FQDN (in a thread, at start); Api applies it before the token.
###############################################################################

#: methods that change nothing: any page may send them (a browser lets it read the
#: answer only if it is same-origin, which the Host check ensures)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def host_of(value: str) -> str | None:
    """The name or address of a Host header (or an origin's host:port), lower case,
    without port, brackets or a trailing dot; None if it is malformed."""
    value = value.lower()
    if value.startswith("["):
        address, sep, rest = value[1:].partition("]")
        if not sep or (rest and not re.fullmatch(r":[0-9]{1,5}", rest)):
            return None
        return address
    name, sep, port = value.rpartition(":")
    if not sep:
        name = value
    elif not re.fullmatch(r"[0-9]{1,5}", port) or ":" in name:
        return None
    return name.rstrip(".") or None


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RequestGuard:
    """The Host names the API answers to and the origins that may change its state.

    Accepted in Host: no Host at all (HTTP/1.0), any IP address (no DNS name can be
    rebound into one), localhost and *.localhost, HOST, HOSTNAME, the machine's name
    and FQDN, and HTTP_ALLOWED_HOSTS. A request that changes state (POST, DELETE...)
    is refused when a browser says it comes from another site (Sec-Fetch-Site:
    cross-site) or from an origin that is not this API's (Origin); clients that are
    no browser send neither, and are not concerned.
    """

    def __init__(self, port: int, names: Iterable[str], allowed: Sequence[str] = ()):
        self.port = port
        self.any = "*" in allowed
        self.listed = {name for name in allowed if not name.startswith(".")}
        self.suffixes = tuple(name for name in allowed if name.startswith("."))
        self.names = {name.lower().rstrip(".") for name in names if name} | self.listed
        self._good = BoundedCache(256)  #: Host header values found good

    def host_ok(self, host: str | None) -> bool:
        """Whether a request with this Host header (None: none) is for this API."""
        if not host or host in self._good:
            return True
        name = host_of(host)
        ok = name is not None and self.name_ok(name)
        if ok:
            self._good.put(host, True)
        return ok

    def name_ok(self, name: str) -> bool:
        return self.any or name in self.names or name == "localhost" or \
            name.endswith((".localhost", *self.suffixes)) or is_ip_address(name)

    def learn_fqdn(self) -> None:
        """Add the machine's FQDN: a resolver's look-up, which may take seconds when DNS
        is broken, so the Daemon runs it in a thread at start (until then, only the
        other names are accepted; the set is replaced whole, never changed in place)."""
        with contextlib.suppress(OSError, UnicodeError):
            # socket.getfqdn(), but an ASCII name goes as bytes: as a str it would
            # import the idna codec and unicodedata (0.25 MB) for good
            name = socket.gethostname()
            with contextlib.suppress(OSError):
                host, aliases, _ = socket.gethostbyaddr(
                    name.encode("ascii") if name.isascii() else name)
                name = next((n for n in (host, *aliases) if "." in n), host)
            self.names = self.names | {name.lower().rstrip(".")}

    def origin_ok(self, headers: Mapping[str, str]) -> bool:
        """Whether a request that changes state may come from where the browser says."""
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return False
        origin = headers.get("origin")
        if origin is None:
            return True  # no browser, or a browser's same-origin request of old
        scheme, sep, netloc = origin.lower().partition("://")
        if not sep or scheme not in ("http", "https") or "/" in netloc:
            return False  # "null" (a sandboxed page, a file), or malformed
        name = host_of(netloc)
        if name is None:
            return False
        if netloc == headers.get("host", "").lower() or name in self.listed or \
                name.endswith(self.suffixes):
            return self.host_ok(netloc)  # the page this API serves (behind a proxy too)
        port = netloc.rpartition(":")[2] if not netloc.endswith("]") else ""
        port_number = int(port) if port.isdigit() and port.isascii() else \
            (443 if scheme == "https" else 80)
        return port_number == self.port and self.host_ok(netloc)


###############################################################################
# API routes: a table of (path -> method -> handler); handlers are short. A request
# for an answer is parsed into its View here; the bytes come from Answers, the
# indexes and held requests from Watchers, the rest from the local host and Health.
###############################################################################

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
WAIT_RE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)(ms|s|m|h)?")
WAIT_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
INDEX_RE = re.compile(r"[0-9]{1,19}")


def parse_index(value: str | None) -> int | None:
    """?index=N: a non-negative integer, or None when absent; HttpError 400 otherwise."""
    if value is None:
        return None
    if not INDEX_RE.fullmatch(value.strip()):
        raise HttpError(400, f"index={show(value)}: expected a non-negative integer")
    return int(value)


def parse_wait(value: str | None) -> float:
    """?wait=D: 30s, 5m, 1h, 250ms or plain seconds; cut to MAX_WAIT; HttpError 400."""
    if value is None:
        return DEFAULT_WAIT
    match = WAIT_RE.fullmatch(value.strip())
    if not match:
        raise HttpError(400, f"wait={show(value)}: expected a duration like 30s, 5m or 90")
    return min(MAX_WAIT, float(match[1]) * WAIT_UNITS[match[2]])


GO_DURATION_RE = re.compile(r"(?:[0-9]{1,9}(?:\.[0-9]{0,9})?(?:ns|us|µs|ms|s|m|h))+")
GO_DURATION_PART_RE = re.compile(r"([0-9.]+)([a-zµ]+)")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_consul_wait(value: str | None) -> float:
    """?wait=D on Consul's routes: what parse_wait() takes, or a Go duration as Consul
    clients send it (120000ms, 1m30s); cut to MAX_WAIT; HttpError 400."""
    if value is None or WAIT_RE.fullmatch(value.strip()):
        return parse_wait(value)
    value = value.strip()
    if not GO_DURATION_RE.fullmatch(value):
        raise HttpError(400, f"wait={show(value)}: expected a duration like 30s, 5m or 1m30s")
    return min(MAX_WAIT, sum(float(number) * GO_UNITS[unit]
                             for number, unit in GO_DURATION_PART_RE.findall(value)))


#: the answer of a Consul route asked about another datacenter: Consul's empty shapes
CONSUL_ELSEWHERE = {"services": "{}", "node": "null"}
#: GET /v1/health/state/STATE: every check passes
CONSUL_STATES = {"any": True, "passing": True, "warning": False, "critical": False}
CONSUL_READ_ONLY = ("lobbyd's catalog is read-only: a host offers services through its "
                    "labels (service:NAME, service:NAME:port:P, ...), set in its label "
                    "files or through /v1/labels")


def consul_request_view(request: Request, route: str, argument: str, datacenter: str
                        ) -> View:
    """The view a request to a Consul route asks for: ?dc=, ?tag= (service routes; all
    must match), ?node-meta=K:V (all must match). The other parameters change nothing:
    every check passes (?passing), every answer is consistent (?stale, ?consistent,
    ?cached), ?near and ?filter are ignored."""
    dc = request.param("dc")
    if dc and dc != datacenter:
        return consul_view("nothing", CONSUL_ELSEWHERE.get(route, "[]"))
    tags = request.query.get("tag", ()) if route in CONSUL_SERVICE_ROUTES else ()
    return consul_view(route, argument, tags, request.query.get("node-meta", ()))


def discoveries_view(request: Request) -> View:
    """The answer /v1/discoveries and /v1/events give: `labels` wins over `prefixes`."""
    labels = split_list(request.param("labels") or "")
    if labels:
        return View("labels", tuple(labels))
    prefixes = split_list(request.param("prefixes") or "")
    return View("prefixes", prefixes=tuple(prefixes)) if prefixes else ALL


def resolve_view(request: Request) -> View:
    label = request.param("label")
    if not label:
        raise HttpError(400, "missing query parameter: label")
    return View.resolve(label)


def prometheus_view(request: Request) -> View:
    return View.job(request.path[len("/v1/prometheus/"):])


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, render_json(value), JSON_TYPE)


class Api:
    """Answers requests: routing, the token, and one short handler per route.

    `local` is the local host (its packet, labels, leases), `health` says how this
    lobbyd is doing (report and metric families).
    """

    def __init__(self, config: Config, answers: Answers, watchers: Watchers, local: LocalHost,
                 health: Health):
        self.answers = answers
        self.watchers = watchers
        self.local = local
        self.health = health
        self.token = config.token.encode("utf-8", "surrogateescape")
        self.guard = RequestGuard(config.port, (config.host, local.hostname, socket.gethostname()),
                                  config.http_allowed_hosts)
        discoveries = self.watched(discoveries_view)
        self.routes: dict[str, dict[str, Callable[[Request], Any]]] = {
            "/": {"GET": discoveries},
            "/v1/discoveries": {"GET": discoveries},
            "/v1/discovery": {"GET": self.watched(lambda request: LOCAL)},
            "/v1/resolve": {"GET": self.watched(resolve_view)},
            "/v1/labels": {"GET": self.list_labels, "POST": self.add_labels,
                           "DELETE": self.delete_labels},
            "/v1/events": {"GET": self.events},
            "/v1/health": {"GET": self.report},
            "/metrics": {"GET": self.metrics},
            PAGE_PATH: {"GET": self.page},
        }
        self.prefix_routes = {"/v1/prometheus/": {"GET": self.watched(prometheus_view)}}
        self.datacenter = answers.consul.datacenter
        self.add_consul_routes()

    # dispatch ----------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        try:
            self.check_origin(request)
            if request.path in ("/", PAGE_PATH) and request.method in ("GET", "HEAD") and (
                    request.path == PAGE_PATH or
                    prefers_html(request.headers.get("accept", ""))):
                return self.page(request)  # holds no data: served without the token
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

    def at_once(self, head: bytes, most: float) -> Prepared | None:
        """HttpServer's at_once: what a repeated head got last time while it still is
        the answer (see Answers.repeated). The token is compared once per request,
        this one included, and only once the answer is known to go out."""
        try:
            found = self.answers.repeated(head, most)
            if found is None or not self.allowed(found[1]):
                return None
        except Exception:  # a bug: the whole way answers it (a 500, logged)
            return None
        return found[0]

    def check_origin(self, request: Request) -> None:
        """Refuse a Host this API is not (DNS rebinding) and a state change that a
        page of another origin asks for (see RequestGuard)."""
        headers = request.headers
        if not self.guard.host_ok(headers.get("host")):
            raise HttpError(421, f"this API does not answer to the name {show(headers['host'])}; "
                                 "an operator adds it to HTTP_ALLOWED_HOSTS")
        if request.method not in SAFE_METHODS and not self.guard.origin_ok(headers):
            raise HttpError(403, "refused: a web page of another site may not change this "
                                 "lobbyd (Origin or Sec-Fetch-Site)")

    def authorize(self, request: Request) -> None:
        if not self.allowed(request.headers):
            given = request.param("token")  # Consul's clients may send it so
            if given is None or not hmac.compare_digest(
                    given.encode("utf-8", "surrogateescape"), self.token):
                raise HttpError(403, "access denied")

    def allowed(self, headers: Mapping[str, str]) -> bool:
        """The request carries TOKEN (if one is set), compared in constant time: in
        Authorization (Token or Bearer), or in X-Consul-Token as Consul's clients send it."""
        if not self.token:
            return True
        scheme, _, given = headers.get("authorization", "").strip().partition(" ")
        # headers were decoded as latin-1: encoding back gives the bytes that were sent
        ok = hmac.compare_digest(given.strip().encode("latin-1"), self.token)
        if ok and scheme.lower() in ("token", "bearer"):
            return True
        consul = headers.get("x-consul-token")
        return consul is not None and hmac.compare_digest(consul.encode("latin-1"), self.token)

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

    # watched answers (SPEC 8) --------------------------------------------------
    def watched(self, view_of: Callable[[Request], View]) -> Callable[[Request], Any]:
        """The answer of the request's view, with X-Lobby-Index, held while ?index=
        is still current."""
        def answer(request: Request) -> Response | Awaitable[Response]:
            view = view_of(request)
            index = parse_index(request.param("index"))
            wait = parse_wait(request.param("wait"))
            if index is not None:
                return self._held(request, view, index, wait)
            return self.answer(request, view)  # no coroutine: the hot path
        return answer

    async def _held(self, request: Request, view: View, index: int, wait: float) -> Response:
        await self.watchers.hold(view, index, wait, request.reader)
        return self.answer(request, view, repeat=False)  # the same ?index= is held again

    def answer(self, request: Request, view: View, repeat: bool = True) -> Response:
        if view.kind != "discovery":
            return self.answers.answer(request, view, repeat)
        self.local.reread_labels()  # never older than the files (SPEC 3)
        response = json_response(self.local.packet().to_json())
        # after the body: the index then describes what the body shows
        response.headers["X-Lobby-Index"] = str(self.watchers.index(view))
        self.say_stale(response)
        return response

    # Consul's API (SPEC 13) -------------------------------------------------------
    def add_consul_routes(self) -> None:
        consul = self.consul

        def missing(request: Request) -> Response:
            raise HttpError(404, f"no such path: {show(request.path)} (lobbyd answers the "
                            "read-only part of Consul's API)")
        self.routes.update({
            "/v1/agent/self": self.read_only({"GET": self.agent_self}),
            "/v1/status/leader": {"GET": self.status_leader},
            "/v1/status/peers": {"GET": self.status_peers},
            "/v1/catalog/datacenters": consul("datacenters"),
            "/v1/catalog/services": consul("services"),
            "/v1/catalog/nodes": consul("nodes"),
        })
        self.prefix_routes.update({  # the first prefix that fits wins: longest first
            "/v1/catalog/service/": consul("service", "/v1/catalog/service/"),
            "/v1/catalog/node/": consul("node", "/v1/catalog/node/"),
            "/v1/health/service/": consul("health", "/v1/health/service/"),
            "/v1/health/checks/": consul("service-checks", "/v1/health/checks/"),
            "/v1/health/node/": consul("node-checks", "/v1/health/node/"),
            "/v1/health/state/": {"GET": self.health_state},
            "/v1/kv/": self.read_only({"GET": self.kv}),
            "/v1/agent/": self.read_only({"GET": missing}),
            "/v1/catalog/": self.read_only({"GET": missing}),
        })

    def read_only(self, methods: dict[str, Callable[[Request], Any]]
                  ) -> dict[str, Callable[[Request], Any]]:
        """Consul's writes get a 405 that says where labels are set."""
        def refuse(request: Request) -> Response:
            raise HttpError(405, CONSUL_READ_ONLY, {"Allow": "GET, HEAD"})
        return {**methods, "PUT": refuse, "POST": refuse, "DELETE": refuse}

    def consul(self, route: str, prefix: str = "") -> dict[str, Callable[[Request], Any]]:
        """The methods of a Consul route that answers view `route`: its argument (a
        service or node name) is what follows `prefix`; blocking as Consul's own."""
        datacenter = self.datacenter

        def answer(request: Request) -> Response | Awaitable[Response]:
            view = consul_request_view(request, route, request.path[len(prefix):] if prefix
                                       else "", datacenter)
            return self.consul_answer(request, view)
        return self.read_only({"GET": answer})

    def consul_answer(self, request: Request, view: View) -> Response | Awaitable[Response]:
        index = parse_index(request.param("index"))
        if index is not None:
            return self._held(request, view, index, parse_consul_wait(request.param("wait")))
        return self.answers.answer(request, view)

    def health_state(self, request: Request) -> Response | Awaitable[Response]:
        state = request.path[len("/v1/health/state/"):]
        if state not in CONSUL_STATES:
            raise HttpError(400, f"no such check state: {show(state)} (any, passing, "
                            "warning, critical)")
        route = "checks" if CONSUL_STATES[state] else "nothing"
        view = consul_request_view(request, route, "" if CONSUL_STATES[state] else "[]",
                                   self.datacenter)
        return self.consul_answer(request, view)

    def kv(self, request: Request) -> Response | Awaitable[Response]:
        """No key exists: 404, after holding a blocking query for its wait (a client that
        long-polls a key would spin otherwise)."""
        view = consul_view("nothing", "null")
        index = parse_index(request.param("index"))
        if index is not None:
            return self._kv_held(request, view, index,
                                 parse_consul_wait(request.param("wait")))
        return self.consul_missing(request, view)

    async def _kv_held(self, request: Request, view: View, index: int, wait: float
                       ) -> Response:
        await self.watchers.hold(view, index, wait, request.reader)
        return self.consul_missing(request, view)

    def consul_missing(self, request: Request, view: View) -> Response:
        return self.say_stale(Response(404, b"", TEXT_TYPE,
                                       consul_headers(self.watchers.index(view))))

    def agent_self(self, request: Request) -> Response:
        """This lobbyd as Consul's agent describes itself (Prometheus reads Datacenter)."""
        packet = self.local.packet()
        hostname, node = packet.hostname, consul_node(packet.labels)
        node_id = consul_node_id(hostname)
        return self.say_stale(Response(200, consul_compact({
            "Config": {"Datacenter": self.datacenter, "NodeName": hostname, "NodeID": node_id,
                       "Server": False, "Version": __version__, "Revision": "lobbyd"},
            "Member": {"Name": hostname, "Addr": node.address or hostname, "Port": 8301,
                       "Tags": {"dc": self.datacenter, "id": node_id, "role": "node"},
                       "Status": 1},
            "Meta": dict(node.meta)}) + b"\n", JSON_TYPE))

    def status_leader(self, request: Request) -> Response:
        """A leader's address, as clients expect one (lobbyd has no leader: each answers)."""
        packet = self.local.packet()
        address = with_port(consul_node(packet.labels).address or "127.0.0.1", "8300")
        return self.say_stale(Response(200, consul_compact(address) + b"\n", JSON_TYPE))

    def status_peers(self, request: Request) -> Response:
        leader = json.loads(self.status_leader(request).body)
        return self.say_stale(Response(200, consul_compact([leader]) + b"\n", JSON_TYPE))

    def events(self, request: Request) -> Response:
        view = discoveries_view(request)
        watchers = self.watchers
        response = self.say_stale(Response(200, b"", EVENTS_TYPE))
        response.stream = lambda reader, writer: watchers.stream(view, reader, writer,
                                                                 response.headers)
        return response

    def say_stale(self, response: Response) -> Response:
        """X-Lobby-Stale on an answer made here, not by Answers, while cut off (SPEC 16)."""
        stale = self.answers.cut.stale(time.time())
        if stale:
            response.headers["X-Lobby-Stale"] = str(stale)
        return response

    # the rest ----------------------------------------------------------------
    def page(self, request: Request) -> Response:
        """The page for people (SPEC 12); at / it depends on Accept, and says so."""
        headers = dict(PAGE_HEADERS)
        if request.path == "/":
            headers["Vary"] = "Accept"
        return Response(200, PAGE_BYTES, HTML_TYPE, headers)

    def report(self, request: Request) -> Response:
        healthy, body = self.health.report()
        return json_response(body, 200 if healthy else 503)

    def metrics(self, request: Request) -> Response:
        return Response(200, render_metrics(self.health.families()), METRICS_TYPE)

    async def add_labels(self, request: Request) -> Response:
        ttl_param = request.param("ttl")
        try:
            ttl = None if ttl_param is None else parse_ttl(ttl_param)
        except LabelError as exc:
            raise HttpError(400, f"{exc}; nothing was changed") from None
        labels = self.request_labels(request)
        if len(set(self.local.labels).union(labels)) > MAX_LABELS:
            raise HttpError(400, f"a host may carry at most {MAX_LABELS} labels")
        if ttl is not None:
            await self.local.add_leases(labels, ttl)
            return Response(200, b"OK", TEXT_TYPE)
        return await self.change_labels(labels, ())

    async def delete_labels(self, request: Request) -> Response:
        labels = self.request_labels(request)
        await self.local.end_leases(labels)  # a lease and a runtime label: both go
        return await self.change_labels((), labels)

    def list_labels(self, request: Request) -> Response:
        """Where every local label comes from (SPEC 9)."""
        return json_response(self.local.label_sources())

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
            await self.local.change_runtime_labels(add, remove)
        except NotDurable as exc:  # the change is made: an honest 500, not "nothing changed"
            path = self.local.runtime.path
            log.error("saved runtime labels to %s, but cannot sync its directory: %s; they "
                      "may not survive a power loss", path, exc.strerror or exc)
            raise HttpError(500, f"labels saved to {path} and published, but its directory "
                            f"cannot be synced ({exc.strerror or exc}): they may not survive "
                            "a power loss") from None
        except OSError as exc:
            status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            path = self.local.runtime.path
            log.error("cannot save runtime labels to %s: %s", path, exc.strerror or exc)
            raise HttpError(status, f"cannot save runtime labels to {path}: "
                            f"{exc.strerror or exc}; nothing was changed") from None
        return Response(200, b"OK", TEXT_TYPE)


###############################################################################
# DNS: the zone DNS_DOMAIN over UDP and TCP, answered from the registry and the service
# model (Queries). dnslib parses and builds the messages, imported only when DNS_PORT
# is set. DnsAnswers (no socket: query bytes in, reply bytes out) owns the answers kept
# per (question, registry version) and the counts by type and rcode; DnsServer owns its
# UDP socket and TCP connections.
###############################################################################

#: DNS message types, classes and rcodes lobbyd speaks
QTYPE_A, QTYPE_NS, QTYPE_SOA, QTYPE_TXT, QTYPE_AAAA, QTYPE_SRV, QTYPE_OPT, QTYPE_ANY = \
    1, 2, 6, 16, 28, 33, 41, 255
NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 3, 4, 5
#: the types /metrics names (any other is "other": clients choose them)
DNS_TYPE_NAMES = {0: "none", 1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX",
                  16: "TXT", 28: "AAAA", 33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY",
                  -1: "other"}
DNS_RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
                   5: "REFUSED", 16: "BADVERS"}
#: the UDP size our EDNS0 record offers; the largest UDP answer a client's may ask for
DNS_EDNS_SIZE, DNS_UDP_MAX = 4096, 65507
#: answers kept (each a few hundred bytes; a flood of new names only refills it)
DNS_CACHE_ENTRIES, DNS_CACHE_BYTES = 4096, 16 << 20
#: TCP: connections at once, and how long one may sit idle or take to send a query
DNS_TCP_MAX, DNS_TCP_IDLE = 64, 10.0


def dns_key(data: bytes) -> bytes | None:
    """What the answer to a plain query depends on: the query but its ID and its EDNS0
    options (a cookie differs in every query; lobbyd ignores options). None for
    anything else: a response, another opcode, compressed or odd sections (the full
    parse then looks at it)."""
    size = len(data)
    if size < 17 or size > 1024 or data[2] & 0xF8 or \
            data[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None
    at = 12
    while True:
        if at >= size:
            return None
        length = data[at]
        if length == 0:
            break
        if length > 63:
            return None
        at += length + 1
    end = at + 5
    additional = data[10:12]
    if additional == b"\x00\x00":
        return data[2:] if end == size else None
    if additional != b"\x00\x01" or data[end:end + 3] != b"\x00\x00\x29" or end + 11 > size \
            or end + 11 + int.from_bytes(data[end + 9:end + 11], "big") != size:
        return None
    return data[2:end + 9]


def dns_name_ok(labels: Sequence[bytes]) -> bool:
    """Whether these labels make a name DNS can carry (1-63 bytes each, 255 in all)."""
    return all(0 < len(label) < 64 for label in labels) and \
        sum(len(label) + 1 for label in labels) < 255


def ip_literal(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


class Instance(NamedTuple):
    """One instance of a service as DNS shows it."""

    hostname: str
    service: Service
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None  #: its address, if an IP
    address: str  #: the service's own address, else the host's
    own: bool  #: the service's own address (not the host's)


class DnsZone:
    """The names of the zone, looked up in lower case (DNS names are case-blind). Kept
    up to date from the registry's notes: a change reads again only the hosts it names
    (the whole registry on the first look, and when the notes were cut)."""

    def __init__(self) -> None:
        #: service name -> hostname -> its instance there
        self.services: dict[bytes, dict[str, Instance]] = {}
        #: hostname -> (hostname as it is, labels, its address if an IP)
        self.nodes: dict[bytes, tuple[str, tuple[str, ...], Any]] = {}
        self.offers: dict[str, list[bytes]] = {}  #: hostname -> the services it offers
        self.place = -1  #: how far into the registry's notes this zone has read

    def update(self, registry: Registry) -> None:
        changed = registry.noted.since(self.place) if self.place >= 0 else None
        hosts = registry.hosts
        if changed is None:
            self.services.clear()
            self.nodes.clear()
            self.offers.clear()
            for hostname, entry in hosts.items():
                self.add(hostname, entry[0])
        else:
            for hostname in set(changed):
                self.drop(hostname)
                entry = hosts.get(hostname)
                if entry is not None:
                    self.add(hostname, entry[0])
        self.place = registry.noted.end

    def add(self, hostname: str, labels: tuple[str, ...]) -> None:
        address = host_address(hostname, labels)
        ip = ip_literal(address)
        self.nodes[hostname.lower().encode("utf-8", "surrogateescape")] = (hostname, labels, ip)
        offers = self.offers[hostname] = []
        for service in host_services(labels):
            own = service.address
            key = service.name.lower().encode("utf-8", "replace")
            offers.append(key)
            self.services.setdefault(key, {})[hostname] = Instance(
                hostname, service, ip_literal(own) if own else ip, own or address, bool(own))

    def drop(self, hostname: str) -> None:
        node = hostname.lower().encode("utf-8", "surrogateescape")
        if self.nodes.get(node, ("",))[0] == hostname:
            del self.nodes[node]
        for key in self.offers.pop(hostname, ()):
            instances = self.services.get(key, {})
            instances.pop(hostname, None)
            if not instances:
                self.services.pop(key, None)

    def instances(self, service: bytes) -> list[Instance]:
        """The instances of a service, by hostname."""
        return sorted(self.services.get(service, {}).values(), key=operator.itemgetter(0))


#: a record: (owner name as labels, type, data): data is an IP address, a (priority,
#: weight, port, target labels) tuple for SRV, a list of byte strings for TXT, the
#: SOA's (mname, rname, times)
Record = tuple[tuple[bytes, ...], int, Any]


def dns_records(zone: tuple[bytes, ...], name: tuple[bytes, ...], qtype: int, names: DnsZone,
                soa: Record) -> tuple[int, list[Record], list[Record], list[Record]]:
    """(rcode, answers, authority, additional) for `name` (lower case labels) of `qtype`
    in `zone`: the answer builder, pure. REFUSED outside the zone, NXDOMAIN for a name
    not in it, NOERROR without answers (and the SOA) for a name without that type."""
    if name[len(name) - len(zone):] != zone or len(name) < len(zone):
        return REFUSED, [], [], []
    rel = name[:len(name) - len(zone)]
    want = (QTYPE_A, QTYPE_AAAA, QTYPE_SRV, QTYPE_TXT, QTYPE_SOA) if qtype == QTYPE_ANY \
        else (qtype,)
    answers: list[Record] = []
    extra: list[Record] = []
    if not rel:  # the apex
        if QTYPE_SOA in want:
            answers.append(soa)
    elif len(rel) == 1 and rel[0] in (b"service", b"node", b"addr"):
        pass  # names with names below them only: they exist, without records
    elif rel[-1] == b"service" and len(rel) in (2, 3):
        if len(rel) == 3 and rel[1] == b"_tcp" and rel[0][:1] == b"_":
            found = names.instances(rel[0][1:])
            want = tuple(kind for kind in want if kind == QTYPE_SRV)
        else:
            found = names.instances(rel[-2])
            if len(rel) == 3:
                tag = rel[0]
                found = [one for one in found
                         if any(t.lower().encode("utf-8", "replace") == tag
                                for t in one.service.tags)]
        if not found:
            return NXDOMAIN, [], [soa], []
        for kind in want:
            if kind in (QTYPE_A, QTYPE_AAAA):
                version = 4 if kind == QTYPE_A else 6
                for ip in dict.fromkeys(one.ip for one in found if one.ip is not None):
                    if ip.version == version:  # type: ignore[union-attr]
                        answers.append((name, kind, ip))
            elif kind == QTYPE_SRV:
                for one in found:
                    target = srv_target(one, zone)
                    if target is None:
                        continue
                    record = (name, QTYPE_SRV, (1, 1, one.service.port, target))
                    if record in answers:
                        continue
                    answers.append(record)
                    if one.ip is not None:
                        glue = (target, QTYPE_A if one.ip.version == 4 else QTYPE_AAAA, one.ip)
                        if glue not in extra:
                            extra.append(glue)
    elif rel[-1] == b"node" and len(rel) >= 2:
        node = names.nodes.get(b".".join(rel[:-1]))
        if node is None:
            return NXDOMAIN, [], [soa], []
        _hostname, labels, ip = node
        for kind in want:
            if kind in (QTYPE_A, QTYPE_AAAA) and ip is not None and \
                    ip.version == (4 if kind == QTYPE_A else 6):
                answers.append((name, kind, ip))
            elif kind == QTYPE_TXT:
                for label in labels:
                    data = label.encode("utf-8", "surrogateescape")
                    answers.append((name, QTYPE_TXT, [data[at:at + 255]
                                                      for at in range(0, len(data), 255)]
                                    or [b""]))
    elif rel[-1] == b"addr" and len(rel) == 2 and len(rel[0]) in (8, 32):
        try:
            ip = ipaddress.ip_address(bytes.fromhex(rel[0].decode("ascii")))
        except ValueError:
            return NXDOMAIN, [], [soa], []
        for kind in want:
            if kind == (QTYPE_A if ip.version == 4 else QTYPE_AAAA):
                answers.append((name, kind, ip))
    else:
        return NXDOMAIN, [], [soa], []
    return NOERROR, answers, [] if answers else [soa], extra


def srv_target(one: Instance, zone: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
    """Where an SRV record points: HOST.node.ZONE for an instance at its host's address,
    else ADDRESS-IN-HEX.addr.ZONE; a service address that is a name is the target itself
    (outside the zone: the client's resolver finds it). None: not a name DNS carries."""
    if not one.own:
        target = (*one.hostname.encode("utf-8", "surrogateescape").split(b"."), b"node", *zone)
        if dns_name_ok(target):
            return target
    if one.ip is not None:
        return (one.ip.packed.hex().encode(), b"addr", *zone)
    target = tuple(one.address.encode("utf-8", "surrogateescape").rstrip(b".").split(b"."))
    return target if one.own and dns_name_ok(target) else None


class DnsAnswers:
    """Query bytes in, reply bytes out (or None: dropped); nothing here touches a socket.

    A plain query (dns_key) whose answer was built at this registry version is
    answered from the kept bytes with its own ID: no parse, no build.
    """

    def __init__(self, registry: Registry, expire: Callable[[], None], domain: str, ttl: int):
        import dnslib  # only here: a lobbyd without DNS_PORT never imports it

        self.lib = dnslib
        self.registry = registry
        self.expire = expire
        self.zone = tuple(domain.rstrip(".").encode("ascii").split(b"."))
        self.ttl = ttl
        self.kept = BoundedCache(DNS_CACHE_ENTRIES, DNS_CACHE_BYTES)
        self.kept_version = -1
        self.names = DnsZone()
        #: (type, rcode) -> queries answered; packets dropped (responses, garbage)
        self.counts: dict[tuple[int, int], int] = {}
        self.dropped = 0

    def respond(self, data: bytes, tcp: bool) -> bytes | None:
        """The reply to one message (UDP: truncated to what the client takes)."""
        self.expire()
        if self.registry.version != self.kept_version:
            self.kept.clear()
            self.kept.cost = 0
            self.kept_version = self.registry.version
            self.names.update(self.registry)
        key = dns_key(data)
        if key is not None:
            kept = self.kept.get((key, tcp))
            if kept is not None:
                counts = self.counts
                counts[kept[1]] = counts.get(kept[1], 0) + 1
                return data[:2] + kept[0]
        try:
            reply, counted = self.build(data, tcp)
        except Exception as exc:  # whatever a packet holds: it costs itself, nothing more
            log.debug("DNS: cannot answer a query: %s", describe_error(exc))
            reply, counted = None, None
        if reply is None or counted is None:
            self.dropped += 1
            return None
        if counted[0] not in DNS_TYPE_NAMES:  # a type of a client's choosing: one sample
            counted = (-1, counted[1])
        self.counts[counted] = self.counts.get(counted, 0) + 1
        if key is not None:
            self.kept.put((key, tcp), (reply[2:], counted), len(reply))
        return reply

    def header_only(self, data: bytes, rcode: int) -> tuple[bytes | None, tuple[int, int]]:
        """A reply with `rcode` and no sections, for a query we cannot or will not read;
        None for a response or a runt."""
        if len(data) < 12 or data[2] & 0x80:
            return None, (0, rcode)
        flags = 0x8000 | (data[2] & 0x79) << 8 | rcode  # QR, the opcode and RD kept
        return data[:2] + flags.to_bytes(2, "big") + bytes(8), (0, rcode)

    def build(self, data: bytes, tcp: bool) -> tuple[bytes | None, tuple[int, int] | None]:
        lib = self.lib
        if len(data) < 12 or data[2] & 0x80:
            return None, None  # a runt, or a response: never answered
        if (data[2] >> 3) & 0x0F:
            return self.header_only(data, NOTIMP)
        try:
            query = lib.DNSRecord.parse(data)
        except Exception:
            return self.header_only(data, FORMERR)
        if len(query.questions) != 1:
            return self.header_only(data, FORMERR)
        opts = [rr for rr in query.ar if rr.rtype == QTYPE_OPT]
        if len(opts) > 1:
            return self.header_only(data, FORMERR)
        question = query.q
        qtype = question.qtype
        header = lib.DNSHeader(id=query.header.id, qr=1, aa=1, ra=0, rd=query.header.rd,
                               cd=query.header.cd)
        reply = lib.DNSRecord(header, q=question)
        limit = 0xFFFF if tcp else 512
        if opts:
            limit = 0xFFFF if tcp else max(512, min(opts[0].rclass, DNS_UDP_MAX))
            if (opts[0].ttl >> 16) & 0xFF:  # an EDNS version past 0: BADVERS
                reply.add_ar(lib.EDNS0(udp_len=DNS_EDNS_SIZE, ext_rcode=1))
                header.aa = 0
                return self.packed(reply, limit), (qtype, 16)
            reply.add_ar(lib.EDNS0(udp_len=DNS_EDNS_SIZE))
        if question.qclass not in (1, 255):
            header.rcode = REFUSED
            header.aa = 0
            return self.packed(reply, limit), (qtype, REFUSED)
        name = tuple(label.lower() for label in question.qname.label)
        rcode, answers, authority, extra = dns_records(self.zone, name, qtype, self.names,
                                                       self.soa())
        header.rcode = rcode
        if rcode == REFUSED:
            header.aa = 0
        asked = question.qname
        for owner, kind, value in answers:
            reply.add_answer(self.rr(asked if owner == name else owner, kind, value))
        for owner, kind, value in authority:
            reply.add_auth(self.rr(owner, kind, value))
        for owner, kind, value in extra:
            reply.add_ar(self.rr(owner, kind, value))
        return self.packed(reply, limit), (qtype, rcode)

    def soa(self) -> Record:
        zone = self.zone
        times = (self.registry.version & 0xFFFFFFFF, 3600, 600, 86400, self.ttl)
        return zone, QTYPE_SOA, ((b"ns", *zone), (b"hostmaster", *zone), times)

    def rr(self, owner: Any, kind: int, value: Any) -> Any:
        lib = self.lib
        if kind == QTYPE_A:
            data = lib.A(str(value))
        elif kind == QTYPE_AAAA:
            data = lib.AAAA(str(value))
        elif kind == QTYPE_SRV:
            priority, weight, port, target = value
            data = lib.SRV(priority, weight, port, lib.DNSLabel(list(target)))
        elif kind == QTYPE_TXT:
            data = lib.TXT(value)
        else:
            mname, rname, times = value
            data = lib.SOA(lib.DNSLabel(list(mname)), lib.DNSLabel(list(rname)), times)
        owner = owner if isinstance(owner, lib.DNSLabel) else lib.DNSLabel(list(owner))
        return lib.RR(owner, kind, ttl=self.ttl, rdata=data)

    def packed(self, reply: Any, limit: int) -> bytes:
        """The reply's bytes within `limit`: past it, with fewer additional records (the
        SRV targets' addresses: no TC for them, RFC 2181), then the question alone (and
        the OPT) with TC set; the client asks again over TCP. Over TCP (a host's thousand
        long labels), as many records as fit."""
        data = bytes(reply.pack())
        if len(data) <= limit:
            return data
        opt = [rr for rr in reply.ar if rr.rtype == QTYPE_OPT]
        extra = [rr for rr in reply.ar if rr.rtype != QTYPE_OPT]
        if extra:  # as many as fit
            reply.ar = opt
            data = bytes(reply.pack())
            if len(data) <= limit:
                # a guess first, each name compressed but its first label (one more pack),
                # then a bisection if the guess was too many
                room, guess = limit - len(data), 0
                for rr in extra:
                    room -= len(rr.rname.label[0]) + 15 + (4 if rr.rtype == QTYPE_A else 16)
                    if room < 0:
                        break
                    guess += 1
                reply.ar = extra[:guess] + opt
                data = bytes(reply.pack())
                if len(data) <= limit:
                    return data
                low, high = 0, guess  # `low` records fit, `high` do not
                while high - low > 1:
                    middle = (low + high) // 2
                    reply.ar = extra[:middle] + opt
                    if len(reply.pack()) <= limit:
                        low = middle
                    else:
                        high = middle
                reply.ar = extra[:low] + opt
                return bytes(reply.pack())
        reply.header.tc = 1
        if limit < 0xFFFF:
            reply.rr, reply.auth, reply.ar = [], [], opt
            return bytes(reply.pack())
        reply.ar = opt
        while reply.rr and len(data) > limit:
            del reply.rr[len(reply.rr) // 2:]  # halves: a few packs at most
            data = bytes(reply.pack())
        return data


class DnsProtocol(asyncio.DatagramProtocol):
    """UDP: one reply per query, sent at once; nothing waits, nothing is kept."""

    def __init__(self, answers: DnsAnswers):
        self.answers = answers
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.answers.respond(data, False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS: %s", describe_error(exc))  # e.g. a client's port unreachable


class DnsServer:
    """DNS on HOST:DNS_PORT, UDP and TCP (at most DNS_TCP_MAX connections, each closed
    after DNS_TCP_IDLE seconds without a whole query)."""

    def __init__(self, answers: DnsAnswers):
        self.answers = answers
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.where = ""

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.where = f"{host} port {port}"
        try:
            self.udp, _protocol = await loop.create_datagram_endpoint(
                lambda: DnsProtocol(self.answers), local_addr=(host, port))
            self.tcp = await asyncio.start_server(self.serve, host, port,
                                                  backlog=LISTEN_BACKLOG)
        except OSError as exc:
            await self.close()
            if exc.errno == errno.EACCES:
                raise ConfigError(f"DNS_PORT={port}: not allowed to listen there ({exc.strerror}"
                                  "); use a port above 1023, e.g. 8600, and forward the zone "
                                  "to it") from None
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
                raise ConfigError(f"HOST={show(host)}: cannot listen there for DNS: "
                                  f"{exc.strerror}") from None
            raise OSError(f"DNS_PORT={port}: cannot listen on {host}: "
                          f"{exc.strerror or exc}") from None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.writers) >= DNS_TCP_MAX:
            writer.close()
            return
        self.writers.add(writer)
        timer = deadline(DNS_TCP_IDLE, writer.transport.abort)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                query = await reader.readexactly(size)
                reply = self.answers.respond(query, True)
                if reply is None:
                    break  # a response or garbage: this connection has nothing to say
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
                timer.move(DNS_TCP_IDLE)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away, stalled, or sent what cannot be answered
        finally:
            timer.cancel()
            self.writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
        for writer in list(self.writers):
            writer.close()

    def state(self) -> dict[str, Any]:
        """What GET /v1/health says of DNS."""
        return {"listening": self.udp is not None and self.tcp is not None,
                "address": self.where, "domain": ".".join(
                    part.decode() for part in self.answers.zone) + ".",
                "tcp_connections": len(self.writers),
                "queries": sum(self.answers.counts.values()),
                "dropped": self.answers.dropped}

    def families(self) -> list[Family]:
        """The DNS families of GET /metrics."""
        counts = self.answers.counts
        return [
            Family("lobbyd_dns_queries_total", "counter", "DNS queries answered, by type "
                   "and rcode.",
                   [({"type": DNS_TYPE_NAMES.get(kind, "other"),
                      "rcode": DNS_RCODE_NAMES.get(rcode, str(rcode))}, count)
                    for (kind, rcode), count in sorted(counts.items())]),
            Family("lobbyd_dns_dropped_total", "counter",
                   "DNS messages dropped unanswered (responses, runts, failures).",
                   [({}, self.answers.dropped)]),
        ]


###############################################################################
# Commands: CALLBACK and exec checks run through one `run_command()`: a process
# group of its own, bounded by a timeout, its output kept short.
###############################################################################

#: after a command exits, how long its output may still come (a grandchild may hold
#: the pipe open: its output is not waited for)
OUTPUT_GRACE = 0.5


#: lobbyd's secrets, which no command it runs sees (a check's output is in /v1/health):
#: these variables, and every NATS_* or REDIS_* one whose name says it is a secret
SECRET_VARS = frozenset({"TOKEN", "REDIS_PASSWORD"})
SECRET_NAME_RE = re.compile(r"(NATS|REDIS)_\w*(PASS|TOKEN|CRED|NKEY|SEED|JWT|SECRET|KEY)")


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of CALLBACK and exec checks: lobbyd's, without its secrets;
    NATS_URL stays, without user:password@ or token@."""
    env = {name: value for name, value in environ.items()
           if name not in SECRET_VARS and not SECRET_NAME_RE.match(name)}
    if "NATS_URL" in env:
        env["NATS_URL"] = ",".join(url_without_credentials(url.strip())
                                   for url in env["NATS_URL"].split(","))
    return env


def url_without_credentials(url: str) -> str:
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rsplit("@", 1)[1] if sep else url.rsplit("@", 1)[1]


class CommandResult(NamedTuple):
    code: int | None  #: exit status (negative: killed by that signal)
    output: str  #: the first bytes of stdout and stderr, its lines joined by " | "
    timed_out: bool  #: killed with its process group at the timeout


async def run_command(argv: Sequence[str], stdin: bytes | None, timeout: float,
                      output_kept: int) -> CommandResult:
    """Run `argv` without a shell in a process group of its own, `stdin` fed to it (None:
    /dev/null). At the timeout, or when the caller is cancelled, the whole group is
    killed. OSError if it cannot start."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True, env=child_environment(os.environ))
    timed_out: list[bool] = []

    def time_out() -> None:
        timed_out.append(True)
        kill_group(proc.pid)

    feeding = None if stdin is None else asyncio.ensure_future(feed_stdin(proc, stdin))
    reading = asyncio.ensure_future(read_output(proc, output_kept))
    try:
        with deadline(timeout, time_out):
            code = await proc.wait()
        await asyncio.wait([reading], timeout=OUTPUT_GRACE)
    finally:
        if feeding is not None:
            feeding.cancel()
        reading.cancel()
        if proc.returncode is None:
            kill_group(proc.pid)
            await reaped(proc)
    output = reading.result() if reading.done() and not reading.cancelled() else ""
    return CommandResult(code, output, bool(timed_out))


async def feed_stdin(proc: asyncio.subprocess.Process, body: bytes) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.write(body)
        await proc.stdin.drain()
        proc.stdin.close()
    except (ConnectionError, OSError):
        pass  # the command did not read its stdin: its business


async def read_output(proc: asyncio.subprocess.Process, kept_bytes: int) -> str:
    """The first `kept_bytes` of the output on one line; the rest is read and dropped."""
    kept = bytearray()
    assert proc.stdout is not None
    while True:
        chunk = await proc.stdout.read(65536)
        if not chunk:
            break
        if len(kept) < kept_bytes:
            kept += chunk[:kept_bytes - len(kept)]
    text = kept.decode("utf-8", "replace").strip()
    return " | ".join(line for line in text.splitlines() if line.strip())


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def reaped(proc: asyncio.subprocess.Process) -> None:
    """Wait, at most REAP_WITHIN, until a killed command is gone and its pipes closed.

    A command killed at shutdown whose pipes are still open when the loop closes leaves
    a transport that, collected later, prints a traceback trying to close them. A
    cancellation meanwhile (asyncio.run() cancels every task on its way out) does not
    cut this short: it is the caller's already, and goes on after the wait.
    """
    waiting = asyncio.ensure_future(proc.wait())
    with deadline(REAP_WITHIN, waiting.cancel):
        while not waiting.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([waiting])


#: a SIGKILLed group is reaped in milliseconds; only a child that left the group and
#: holds the output pipe open takes longer, and shutdown does not wait for it
REAP_WITHIN = 0.5


CALLBACK_OUTPUT_KEPT = 2048


class CallbackRunner:
    """Runs CALLBACK on registry changes, with first-run delay, cooldown and coalescing."""

    def __init__(self, argv: Sequence[str], cooldown: float, first_run_delay: float,
                 timeout: float, body: Callable[[], bytes]):
        self.argv = list(argv)
        self.cooldown = cooldown
        self.first_run_delay = first_run_delay
        self.timeout = timeout
        self.body = body  #: what the command reads on stdin: the registry as JSON
        self.dirty = asyncio.Event()
        self.runs: dict[str, int] = {}  # result (ok, failed, timeout, error) -> runs
        self._last_failure = ""

    def notify(self) -> None:
        self.dirty.set()

    async def run(self) -> None:
        """For ever; cancelled, a running command is killed with its process group."""
        await asyncio.sleep(self.first_run_delay)
        self.dirty.set()  # the first run gives the script the initial state
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            await self.run_once()
            await asyncio.sleep(self.cooldown)

    async def run_once(self) -> None:
        name = show(self.argv[0])
        try:
            result = await run_command(self.argv, self.body(), self.timeout,
                                       CALLBACK_OUTPUT_KEPT)
        except OSError as exc:
            self.count("error")
            self.failed(f"callback {name} cannot start: {exc.strerror or exc}")
            return
        output = result.output
        self.count("timeout" if result.timed_out else "ok" if result.code == 0 else "failed")
        if result.timed_out:
            self.failed(f"callback {name} still running after {self.timeout:g}s: killed")
        elif result.code == 0:
            self._last_failure = ""
            log.info("callback %s exited 0%s", name, output and f"; output: {output}")
        else:
            self.failed(f"callback {name} exited {result.code}" +
                        (output and f"; output: {output}"))

    def count(self, result: str) -> None:
        self.runs[result] = self.runs.get(result, 0) + 1

    def failed(self, message: str) -> None:
        """Log a failure; the same failure again is logged at debug level only."""
        level = logging.DEBUG if message == self._last_failure else logging.WARNING
        self._last_failure = message
        log.log(level, "%s", message)


###############################################################################
# Check runner: one task per check, each probe bounded by its timeout.
###############################################################################

HTTP_CHECK_READ = 4096
CHECK_OUTPUT_KEPT = 1024


async def probe_http(url: str) -> tuple[bool, str]:
    """GET the URL; 2xx passes. No redirect is followed, at most HTTP_CHECK_READ bytes read."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    reader, writer = await asyncio.open_connection(
        host, parts.port or (443 if tls else 80),
        ssl=ssl_module().create_default_context() if tls else None)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = parts.netloc.rpartition("@")[2]
        writer.write(f"GET {target} HTTP/1.0\r\nHost: {netloc}\r\nUser-Agent: lobbyd/"
                     f"{__version__}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\n" not in head and len(head) < HTTP_CHECK_READ:
            chunk = await reader.read(HTTP_CHECK_READ - len(head))
            if not chunk:
                break
            head += chunk
    finally:
        writer.close()
    status = head.split(b"\n", 1)[0].decode("latin-1").strip()
    match = re.fullmatch(r"HTTP/[0-9.]+ ([0-9]{3})(?: .*)?", status)
    if not match:
        return False, f"not an HTTP answer: {show(status)}"
    return 200 <= int(match[1]) < 300, status


async def probe_tcp(target: str) -> tuple[bool, str]:
    host, port = split_host_port("tcp", target)
    _reader, writer = await asyncio.open_connection(host, port)
    writer.close()
    return True, f"connected to {target}"


async def probe_exec(argv: Sequence[str], timeout: float) -> tuple[bool, str]:
    """Exit 0 passes; at the timeout (or if the check is stopped) its group is killed."""
    result = await run_command(argv, None, timeout, CHECK_OUTPUT_KEPT)
    if result.timed_out:
        return False, f"still running after {timeout:g}s: killed"
    return result.code == 0, f"exit {result.code}" + (f": {result.output}"
                                                       if result.output else "")


async def run_probe(spec: CheckSpec) -> tuple[bool, str]:
    """(passed, what happened) of one run; never raises but for cancellation."""
    try:
        if spec.kind == "exec":
            passed, output = await probe_exec(spec.argv, spec.timeout)
        else:
            probe = probe_http(spec.target) if spec.kind == "http" else probe_tcp(spec.target)
            passed, output = await within(spec.timeout, probe)
    except asyncio.TimeoutError:
        passed, output = False, f"no answer within {spec.timeout:g}s"
    except (OSError, ValueError, CheckError) as exc:
        passed, output = False, describe_error(exc)
    return passed, output[:CHECK_OUTPUT_KEPT]


class CheckRunner:
    """Runs one check for ever, one run at a time, and reports when it goes up or down."""

    def __init__(self, spec: CheckSpec, on_change: Callable[[CheckRunner], None]):
        self.spec = spec
        self.state = CheckState(spec.rise, spec.fall)
        self.on_change = on_change
        self.task: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())

    def stop(self) -> None:
        """Cancelled mid-run, an exec probe kills its process group on the way out."""
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        while True:
            passed, output = await run_probe(self.spec)
            if self.state.record(passed, output, time.time()):
                log.info("check %s is %s: %s", self.spec.name,
                         "up" if self.state.up else "down", output or "-")
                self.on_change(self)
            await asyncio.sleep(self.spec.interval)


###############################################################################
# Local host: this server's hostname and its labels by source (LABELS, label
# files, the runtime file, leases, checks): the packet it publishes.
###############################################################################


class LocalHost:
    """This server as the fleet sees it. It owns the hostname, the labels of every
    source and the checks' runners; the daemon publishes what it says.

    `changed()` is told of every change of the labels (watchers look), `publish()`
    publishes our packet at once, `renamed(old)` says goodbye for an old hostname.
    """

    def __init__(self, config: Config, changed: Callable[[], None],
                 publish: Callable[[], Awaitable[None]], renamed: Callable[[str], None]):
        self.config = config
        self.changed = changed
        self.publish = publish
        self.renamed = renamed
        self.hostname = config.hostname or socket.gethostname()
        self.labels: tuple[str, ...] = ()
        self.files = LocalLabels(config.labels, Path(config.labels_path))
        self.runtime = RuntimeLabels(config.runtime_labels_file)
        self.leases = Leases()
        self.checks: dict[str, CheckRunner] = {}
        self._checks_reported: dict[str, str] = {}
        self._lease_timer: asyncio.TimerHandle | None = None
        self.label_lock = asyncio.Lock()  #: one read-modify-write of the runtime file
        self.wake = asyncio.Event()  #: set: the keep-alive loop publishes now
        self.stopped = False

    def packet(self) -> Packet:
        return Packet(self.hostname, self.labels, int(time.time()))

    def refresh(self) -> None:
        """Re-read the label files, the checks and the hostname (every keep-alive)."""
        hostname = self.config.hostname or socket.gethostname()
        if hostname != self.hostname:
            old, self.hostname = self.hostname, hostname
            log.info("hostname changed from %s to %s: saying goodbye for the old name",
                     old, hostname)
            self.renamed(old)
        self.refresh_checks()
        if not self.label_lock.locked():  # mid-save the file is older than our labels
            self.set_labels(self.files.collect())

    def reread_labels(self) -> None:
        """The label files as they are on disk now; a change is published at once."""
        if self.label_lock.locked():  # mid-save the file is older than our labels
            return
        before = self.labels
        self.set_labels(self.files.collect())
        if self.labels != before:
            self.wake.set()

    def set_labels(self, labels: tuple[str, ...]) -> None:
        if labels != self.labels:
            shown = ", ".join(labels[:20]) + (f" (+{len(labels) - 20} more)"
                                              if len(labels) > 20 else "")
            log.info("local labels: %s", shown or "(none)")
            self.labels = labels
            self.changed()

    async def change_runtime_labels(self, add: Sequence[str], remove: Sequence[str]) -> None:
        """Save the new labels (two fsyncs, off the event loop), then publish them:
        the fleet only ever hears labels that are on disk.

        OSError if they cannot be saved: nothing was published. NotDurable if they
        were saved but their directory could not be synced: they are published too
        (the file holds them; a re-read of the files would publish them anyway).
        """
        async with self.label_lock:
            current = self.runtime.read()
            new = changed_labels(current, add, remove)
            if new == current:
                return
            try:
                await asyncio.to_thread(self.runtime.save, new)
            except NotDurable:
                self.files.collect()
                self.set_labels(self.files.with_file(self.runtime.path, new))
                await self.publish()
                raise
            self.files.collect()  # a file written just before must be in this packet
            self.set_labels(self.files.with_file(self.runtime.path, new))
            await self.publish()

    # leases -----------------------------------------------------------------------
    async def add_leases(self, labels: Sequence[str], ttl: int) -> None:
        """Lease or re-lease labels; published at once when one is new."""
        if self.leases.add(labels, ttl, time.monotonic()):
            self._source_changed("leases", self.leases.labels())
            await self.publish()
        self._schedule_lease_end()

    async def end_leases(self, labels: Sequence[str]) -> None:
        if self.leases.remove(labels):
            self._source_changed("leases", self.leases.labels())
            await self.publish()
            self._schedule_lease_end()

    def _schedule_lease_end(self) -> None:
        if self._lease_timer is not None:
            self._lease_timer.cancel()
        end = self.leases.next_end()
        self._lease_timer = None if end is None else asyncio.get_running_loop().call_later(
            max(0.0, end - time.monotonic()), self._end_due_leases)

    def _end_due_leases(self) -> None:
        ended = self.leases.expire(time.monotonic())
        if ended and not self.stopped:
            log.info("lease ended: %s", ", ".join(ended[:20]))
            self._source_changed("leases", self.leases.labels())
            self.wake.set()
        self._schedule_lease_end()

    def _source_changed(self, source: str, labels: tuple[str, ...]) -> None:
        self.files.extra[source] = labels
        self.set_labels(self.files.union())

    # checks -----------------------------------------------------------------------
    def refresh_checks(self) -> None:
        """Re-read CHECKS_PATH: start new checks, stop removed or edited ones."""
        specs, problems = scan_check_dir(Path(self.config.checks_path))
        for path, problem in problems.items():
            if self._checks_reported.get(path) != problem:
                log.warning("check file %s: %s; skipped", path, problem)
        self._checks_reported = problems
        gone = [name for name, runner in self.checks.items() if specs.get(name) != runner.spec]
        for name in gone:
            self.checks.pop(name).stop()
            self.files.extra.pop(f"check:{name}", None)  # refresh() publishes it
        for name, spec in specs.items():
            if name not in self.checks and not self.stopped:
                self.checks[name] = CheckRunner(spec, self._check_changed)
                self.checks[name].start()

    def _check_changed(self, runner: CheckRunner) -> None:
        name = runner.spec.name
        if self.checks.get(name) is runner and not self.stopped:
            self._source_changed(f"check:{name}", runner.spec.labels if runner.state.up
                                 else ())
            self.wake.set()

    def check_states(self) -> dict[str, dict[str, Any]]:
        """name -> {"up", "since" (unix seconds), "output"}: for /v1/health and /metrics."""
        return {name: {"up": runner.state.up, "since": int(runner.state.since),
                       "output": runner.state.output}
                for name, runner in sorted(self.checks.items())}

    def label_sources(self) -> dict[str, Any]:
        """GET /v1/labels: every local label by where it comes from."""
        self.reread_labels()
        files = self.files.by_file()
        runtime = files.pop(self.runtime.path.name, [])
        return {"env": sorted(set(self.config.labels)), "files": files, "runtime": runtime,
                "leases": self.leases.seconds_left(time.monotonic()),
                "checks": {name: {"labels": list(runner.spec.labels), "up": runner.state.up}
                           for name, runner in sorted(self.checks.items())}}

    def stop(self) -> None:
        """Shutdown: no check runs any more, no lease ends."""
        self.stopped = True
        for runner in self.checks.values():
            runner.stop()
        if self._lease_timer is not None:
            self._lease_timer.cancel()


###############################################################################
# Daemon: builds the parts, wires them together and owns their tasks (keep-alive,
# clean-up, transports, callback), signals, readiness and shutdown. Nothing else.
###############################################################################

SHUTDOWN_DEADLINE = 3.0
GOODBYE_WITHIN = 0.8  #: then the closes (0.8 s each, together): well within the deadline
READY_TIMEOUT = 5.0


def hard_exit() -> None:
    log.error("shutdown took over %gs: exiting now", SHUTDOWN_DEADLINE)
    logging.shutdown()
    os._exit(0)


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


class Daemon:
    """One lobbyd: the registry, the local host, the transports, the API, the callback."""

    def __init__(self, config: Config, environ: Mapping[str, str]):
        self.config = config
        kv = config.discovery_mode == "kv"  # the hosts bucket says who left, not silence
        self.registry = Registry(math.inf if kv else config.ttl, config.max_hosts)
        self.local = LocalHost(config, self.local_changed, self.publish_local, self.renamed)
        self.watch = Watchers(self.registry, self.local.packet, self.expire,
                              config.node_exporter_port)
        self.counters = Counters()
        self.tasks: list[asyncio.Future[Any]] = []
        self.stop = asyncio.Event()  #: set by a signal: shut down
        self.joined = asyncio.Event()  #: every transport connected and synced once
        self.fleet = Fleet(self.registry, self.counters, LabelCache(), config.ttl,
                           changed=self.registry_changed, expire=self.expire,
                           say_hi=self.publish_local, state_changed=self.tell_systemd,
                           joined=self.joined.set, schedule=self.schedule,
                           own_labels=lambda: self.local.labels,
                           cut=CutOff(config.cut_off_keep))
        self.fleet.hostname = self.local.hostname
        if config.register:
            self.fleet.own_hostname = self.local.hostname
        self.transports: list[Transport] = [
            TRANSPORTS[kind](config, environ, f"lobbyd {self.local.hostname}", self.fleet)
            for kind in (("NATS-KV",) if kv else config.driver)]
        self.callback = (CallbackRunner(config.callback, config.callback_cooldown,
                                        config.callback_first_run_delay,
                                        config.callback_timeout,
                                        lambda: self.answers.registry_json())
                         if config.callback else None)
        self.health = Health(self.registry, self.local, self.transports, self.counters,
                             self.callback.runs if self.callback else {}, self.fleet.cut)
        self.answers = Answers(self.registry, self.watch, self.expire,
                               config.node_exporter_port, config.datacenter,
                               self.fleet.cut)
        self.api = Api(config, self.answers, self.watch, self.local, self.health)
        self.http = HttpServer(self.api.handle, self.api.at_once, self.counters.http_codes,
                               config.http_max_connections_per_address,
                               ("/v1/health", "/metrics"))
        self.dns = DnsServer(DnsAnswers(self.registry, self.expire, config.dns_domain,
                                        config.dns_ttl)) if config.dns_port else None
        self.health.dns = self.dns
        self._stopping = False
        self._peak = 0  #: the most hosts since the memory was last released

    # the registry -----------------------------------------------------------------
    def local_changed(self) -> None:
        self.watch.poke()

    def registry_changed(self) -> None:
        self.watch.poke()
        if self.callback:
            self.callback.notify()

    def expire(self) -> None:
        registry = self.registry
        if len(registry) > self._peak:
            self._peak = len(registry)
        dead = registry.expire(time.time())
        if dead:
            self.counters.left_expired += len(dead)
            log.info("expired (silent for over %ds): %s", self.config.ttl, ", ".join(dead[:20]))
            self.registry_changed()
        elif self._peak - len(registry) > SHRINK_HOSTS and len(registry) < self._peak / 2:
            self.shrunk()  # once the hosts stopped expiring

    def shrunk(self) -> None:
        """Most of the registry is gone (a flood of made-up hosts ended): give the memory
        it held back to the system."""
        log.info("the registry shrank from %d to %s: releasing memory", self._peak,
                 plural(len(self.registry), "host"))
        self._peak = len(self.registry)
        self.registry.compact()
        self.fleet.cache.forget()  # the flood's names and labels
        # once the watchers took the changes (the next turn of the loop) and the
        # caller let go of the expired names
        asyncio.get_running_loop().call_later(0.1, release_memory)


    # publishing -------------------------------------------------------------------
    async def publish(self, packet: Packet, message: str = "hi") -> bool:
        """On every transport; True if at least one took it."""
        sent = 0
        for transport in self.transports:
            sent += await transport.publish(packet, message)
        self.counters.published += sent
        return sent > 0

    async def publish_local(self) -> None:
        if not self.config.register or self._stopping:  # never a hi after our goodbye
            return
        packet = self.local.packet()
        self.fleet.sent_own(packet.labels)
        # we list ourselves even while NATS is away; our own packet refreshes it later
        change = self.registry.apply_hi(packet.hostname, packet.labels, time.time(), own=True)
        if change:
            self.counters.joined += change == NEW_HOST
            self.registry_changed()
        await self.publish(packet)

    def renamed(self, old: str) -> None:
        """The hostname changed: the fleet forgets the old name at once."""
        self.fleet.hostname = self.local.hostname
        if self.config.register:
            self.fleet.own_hostname = self.local.hostname
        self.schedule(self.publish(Packet(old), "goodbye"))
        if self.registry.apply_goodbye(old):
            self.registry_changed()

    async def keep_alive(self) -> None:
        """Every KEEP_ALIVE, and at once when the local host's wake is set (a label
        changed, SIGHUP): re-read the local sources, publish."""
        wake = self.local.wake
        while not self._stopping:
            self.local.refresh()
            await self.publish_local()
            with deadline(self.config.keep_alive, wake.set):
                await wake.wait()
            wake.clear()

    async def clean_up(self) -> None:
        """Expire hosts when they die, not only every CLEAN_EVERY seconds."""
        while not self._stopping:
            self.expire()
            pause = min(self.config.clean_every, self.registry.next_expiry() - time.time())
            await asyncio.sleep(max(0.05, pause + 0.01))

    # readiness and lifecycle ------------------------------------------------------
    def tell_systemd(self) -> None:
        notify_systemd(f"STATUS={self.health.status_text()}")

    async def announce_ready(self) -> None:
        """READY=1 once connected and synced, or after READY_TIMEOUT: never blocks a start."""
        waiting = asyncio.ensure_future(self.joined.wait())
        await asyncio.wait([waiting], timeout=READY_TIMEOUT)
        waiting.cancel()
        notify_systemd(f"READY=1\nSTATUS={self.health.status_text()}")

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
            action = self.local.wake.set if signum == signal.SIGHUP else \
                (lambda: self.request_stop(signal.Signals(signum).name))
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are exiting
                loop.call_soon_threadsafe(action)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.install_signal_handlers(loop)
        watch_binary_loader(loop)
        if not self.config.disable_api:
            await self.listen()  # first: a HOST we cannot listen on is a config error
        if self.dns:
            await self.dns.start(self.config.host, self.config.dns_port)
            log.info("DNS listening on %s (UDP and TCP) for %s", self.dns.where,
                     self.config.dns_domain)
        self.local.runtime.remove_stale_temp_files()
        self.local.refresh()  # before any request can be served: no await in between
        if not self.config.disable_api:
            # a thread of its own, not the loop's executor: a look-up hung on a broken
            # resolver must not hold shutdown, which waits for the executor's threads
            threading.Thread(target=self.api.guard.learn_fqdn, daemon=True).start()
        log.info("lobbyd %s starting as %s (%s)", __version__, self.local.hostname,
                 "publishing" if self.config.register else "client only, not publishing")
        warn_about_timing(self.config)
        self.schedule(self.announce_ready())
        for transport in self.transports:
            self.schedule(transport.run())
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
        self.http.stop_accepting()  # the open requests are answered, streams end below
        self.fleet.own_hostname = None  # our own goodbye is coming back
        self.watch.close()
        self.local.stop()
        for task in list(self.tasks):  # a running CALLBACK is killed with its group
            task.cancel()
        if self.config.register and await self.say_goodbye():
            log.info("said goodbye as %s", self.local.hostname)
            for transport in self.transports:
                await transport.said_goodbye()
        await asyncio.gather(*(transport.close(timeout=0.8) for transport in self.transports))
        await self.http.close()
        if self.dns:
            await self.dns.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=0.3)


    async def say_goodbye(self) -> bool:
        """Our goodbye on every transport, bounded like the closes that follow: a server
        stopping at the same moment (a reboot) may drop it, fail it, leave it hanging or
        cancel what nats-py awaits inside; none of that may fail the shutdown."""
        try:
            return await within(GOODBYE_WITHIN, self.publish(Packet(self.local.hostname),
                                                             "goodbye"))
        except asyncio.TimeoutError:
            log.debug("goodbye: not sent within %gs", GOODBYE_WITHIN)
        except Exception as exc:
            log.debug("goodbye: %s", describe_error(exc))
        return False


def warn_about_timing(config: Config) -> None:
    """Accepted, as the Go daemon does, but said once: such hosts will flap."""
    if config.ttl < 2 * config.keep_alive:
        log.warning("TTL=%d is less than twice KEEP_ALIVE=%d: peers will drop this host "
                    "whenever one keep-alive is late or lost (hosts will flap); "
                    "use TTL of 3 to 6 times KEEP_ALIVE", config.ttl, config.keep_alive)


###############################################################################
# Static binary and systemd: the loader chain of the static binary (staticx, then
# PyInstaller) and sd_notify. From source and in the .deb's one-directory build none
# of the loader part applies.
###############################################################################

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
    loader. From source (not frozen) and in the one-directory build (the .deb's,
    which unpacks nothing: no _MEI directory) there is none.
    """
    if not getattr(sys, "frozen", False) or \
            not os.path.basename(getattr(sys, "_MEIPASS", "")).startswith("_MEI"):
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


def remove_tree(path: str) -> None:
    """`rm -rf path`, ignoring errors, with `os` alone.

    shutil.rmtree would do, but the binary imports its modules from the executable
    staticx unpacked: once staticx's loader has been killed and has removed that
    copy, a first `import shutil` ends the process with PyInstaller's "appears to
    have been moved or deleted" instead of lobbyd's own last line.
    """
    for top, dirs, files in os.walk(path, topdown=False):
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(top, name))
        for name in dirs:
            target = os.path.join(top, name)
            with contextlib.suppress(OSError):
                if os.path.islink(target):  # os.walk does not follow it: neither do we
                    os.unlink(target)
                else:
                    os.rmdir(target)
    with contextlib.suppress(OSError):
        os.rmdir(path)


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

    def stop_now() -> None:  # imports nothing: the archive it would import from may be gone
        log.warning("pid %d (the static binary's loader) ended: exiting at once, no goodbye",
                    pid)
        leftovers = [os.environ.get("STATICX_BUNDLE_DIR", "")]  # staticx's loader is gone
        if os.getppid() != parent:  # and so is PyInstaller's
            leftovers.append(getattr(sys, "_MEIPASS", ""))
        for path in leftovers:
            if os.path.basename(path).startswith(("staticx-", "_MEI")):
                remove_tree(path)
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
    """A driver (or DNS) whose library is missing is bad configuration, said before
    anything runs."""
    import importlib.util

    if "Redis" in config.driver and importlib.util.find_spec("redis") is None:
        raise ConfigError("DRIVER=Redis needs the Python package redis: "
                          "pip install 'lobbyd[redis]'")
    if config.dns_port and importlib.util.find_spec("dnslib") is None:
        raise ConfigError(f"DNS_PORT={config.dns_port} needs the Python package dnslib: "
                          "pip install 'lobbyd[dns]' (Debian: python3-dnslib)")


async def run_daemon(config: Config) -> None:
    # built inside the running loop: on Python 3.9 an asyncio.Event made before it
    # would create (and leak) a loop of its own
    await Daemon(config, os.environ).run()


def config_error(exc: ConfigError) -> int:
    """One line, one format, whether the environment says so or trying it finds it."""
    print(f"lobbyd: configuration error: {exc}", file=sys.stderr)
    return EX_CONFIG


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
        return config_error(exc)
    setup_logging(config.log_level)
    try:
        asyncio.run(run_daemon(config))
    except ConfigError as exc:  # found only on trying it (a HOST not on this machine)
        return config_error(exc)
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
  labels                          this server's labels by where each comes from
  labels add [--ttl S] LABEL...   add runtime labels (with --ttl: a lease of S seconds)
  labels del LABEL...             remove runtime labels
  health                          the daemon's health; exit status 1 when unhealthy
  prometheus NAME                 Prometheus target groups of job NAME
  watch [labels L...|search P...] the servers (those filters as for discoveries), then
                                  each change as it happens, until interrupted

Flags take one or two dashes and `-flag value` or `-flag=value`; their defaults
come from the environment: HOST (127.0.0.1), PORT (1313), PROTOCOL (http), TOKEN.
-json prints the API's JSON on one line. Colour only on a terminal, never with
NO_COLOR set. Exit status: 0 success, 1 lobbyd answered an error or cannot be
reached, 2 bad usage. --version prints the version."""


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
        warn_if_stale(options, response)
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise CtlError(f"cannot reach lobbyd at {options.base}: "
                       f"{unreachable(exc, options.proto == 'https')}") from None
    finally:
        conn.close()


def warn_if_stale(options: CtlOptions, response: Any) -> None:
    """lobbyd is cut off from the fleet (X-Lobby-Stale): say so on stderr, the answer
    still goes to stdout."""
    stale = response.getheader("X-Lobby-Stale")
    if stale:
        print(f"lobbyctl: warning: lobbyd at {options.base} has been cut off from the fleet "
              f"for {stale} s: this is the last known fleet", file=sys.stderr, flush=True)


def unreachable(exc: BaseException, tls: bool = False) -> str:
    """Why a request failed, in words: a TLS handshake with a plain HTTP server (lobbyd
    serves plain HTTP) says which flag is wrong, not `[SSL: ...]`. That server either
    closes at once or, waiting for a request head, lets the handshake time out."""
    import ssl

    if isinstance(exc, ssl.SSLError) or (tls and "handshake" in str(exc)):
        return ("no TLS there (lobbyd serves plain HTTP: use -proto http, or -proto https "
                "only through a TLS proxy in front of it)")
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def answered_error(options: CtlOptions, status: int, text: str) -> CtlError:
    """lobbyd answered `status`: the first line of its message, and what to do about a
    refused token."""
    first = text.strip().splitlines()[0] if text.strip() else "(no message)"
    hint = ""
    if status in (401, 403):
        hint = ("; set TOKEN or -token to lobbyd's TOKEN" if not options.token
                else "; -token (or TOKEN) is not lobbyd's TOKEN")
    return CtlError(f"lobbyd at {options.base} answered {status}: {first}{hint}")


def ctl_call(options: CtlOptions, method: str, path: str, body: bytes = b"",
             accept: Sequence[int] = (200,)) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a request; CtlError for any other status."""
    status, data = ctl_request(options, method, path, body)
    text = data.decode("utf-8", "replace")
    if status not in accept:
        raise answered_error(options, status, text)
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
    if health.get("cut_off_since") is not None:
        ago = format_duration(max(0, now - health["cut_off_since"]))
        lines.append(f"cut off:  {paint.paint('for ' + ago, '31;1')}: the answers show the "
                     "last known fleet")
    for driver in health.get("drivers", []):
        ago = format_duration(max(0, now - driver.get("since", now)))
        state = f"connected to {driver.get('server')}" if driver.get("connected") else \
            paint.paint("disconnected", "31;1") + f" from {driver.get('targets', '?')}"
        lines.append(f"{driver.get('driver')}:     {state} for {ago}, "
                     f"{driver.get('reconnects', 0)} reconnects")
    for name, check in sorted(health.get("checks", {}).items()):
        state = paint.paint("up", "32") if check.get("up") else paint.paint("down", "31;1")
        output = f" ({check['output']})" if check.get("output") else ""
        lines.append(f"check {name}: {state}{output}")
    dns = health.get("dns")
    if isinstance(dns, dict):
        lines.append(f"dns:      {'listening' if dns.get('listening') else 'not listening'} "
                     f"on {dns.get('address')} for {dns.get('domain')}, "
                     f"{dns.get('queries', 0)} queries answered")
    return "".join(line + "\n" for line in lines)


def format_groups(groups: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for group in groups:
        labels = " ".join(f"{key}={value}" for key, value in group.get("Labels", {}).items())
        lines.append(" ".join(group.get("Targets", [])) + (f"    {labels}" if labels else ""))
    return "".join(line + "\n" for line in lines)


def format_label_sources(sources: Mapping[str, Any], paint: Painter) -> str:
    """GET /v1/labels as lines of `SOURCE  LABEL`, the source saying where it comes from."""
    rows = [("env (LABELS)", label) for label in sources.get("env", [])]
    rows += [(f"file {name}", label) for name, labels in sorted(sources.get("files", {}).items())
             for label in labels]
    rows += [("runtime", label) for label in sources.get("runtime", [])]
    rows += [(f"lease ({seconds} s left)", label)
             for label, seconds in sorted(sources.get("leases", {}).items())]
    rows += [(f"check {name} ({'up' if check.get('up') else 'down: not published'})", label)
             for name, check in sorted(sources.get("checks", {}).items())
             for label in check.get("labels", [])]
    if not rows:
        return "(no labels)\n"
    width = max(len(source) for source, _ in rows)
    return "".join(f"{source.ljust(width)}  {paint.label(label)}\n" for source, label in rows)


def ctl_labels(options: CtlOptions, words: list[str], out: Any, paint: Painter) -> None:
    if words[1:] in ([], ["list"]):
        _, sources = ctl_call(options, "GET", "/v1/labels")
        out.write(compact_json(sources) + "\n" if options.json
                  else format_label_sources(sources, paint))
        return
    if len(words) < 3 or words[1] not in ("add", "del"):
        raise CtlUsageError("expected: labels, labels add [--ttl S] LABEL... or "
                            "labels del LABEL...")
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


def ctl_events(options: CtlOptions, path: str) -> Iterator[tuple[str, Any]]:
    """(event, data) of GET /v1/events as they come; CtlError if it cannot be had or ends."""
    import http.client

    if options.proto == "https":
        import ssl

        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            options.host, options.port, timeout=45, context=ssl.create_default_context())
    else:
        # a comment line comes every 15 s: 45 s of silence is a lost daemon
        conn = http.client.HTTPConnection(options.host, options.port, timeout=45)
    headers = {"Authorization": f"Token {options.token}"} if options.token else {}
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise answered_error(options, response.status,
                                 response.read().decode("utf-8", "replace"))
        warn_if_stale(options, response)
        event, data = "message", []
        while True:
            line = response.readline()
            if not line:
                raise CtlError(f"lobbyd at {options.base} ended the event stream")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: "):
                data.append(text[6:])
            elif not text and data:
                yield event, json.loads("\n".join(data))
                event, data = "message", []
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise CtlError(f"event stream from lobbyd at {options.base}: "
                       f"{unreachable(exc, options.proto == 'https')}") from None
    finally:
        conn.close()


def format_event(event: str, data: Mapping[str, Any], paint: Painter) -> str:
    """One change as `lobbyctl watch` prints it."""
    colour = {"joined": "32", "changed": "33", "left": "31"}.get(event, "0")
    what = paint.paint(f"{event:<7}", colour)
    if event == "left":
        return f"{what} {paint.paint(data['hostname'], '1')} ({data.get('reason')})\n"
    labels = ", ".join(paint.label(label) for label in data.get("labels") or [])
    return f"{what} {paint.paint(data['hostname'], '1')}    {labels}\n"


def ctl_filter(command: str, args: list[str]) -> str:
    """The query of `COMMAND [labels LABEL... | search PREFIX...]`: "" for no filter."""
    from urllib.parse import quote

    if not args:
        return ""
    if args[0] not in ("labels", "search") or len(args) < 2:
        raise CtlUsageError(f"expected: {command} [labels LABEL... | search PREFIX...]")
    key = "labels" if args[0] == "labels" else "prefixes"
    return f"?{key}=" + quote(",".join(args[1:]), safe=":,")


#: seconds between attempts to reach a lobbyd that went away (doubling up to the last)
WATCH_RETRY = (0.25, 5.0)


def missed_events(before: Mapping[str, Any], now: Sequence[Mapping[str, Any]]
                  ) -> list[tuple[str, Any]]:
    """The changes between what a watch knew and a new snapshot (after a reconnection:
    a restarted lobbyd's indexes start again, so the snapshots are compared); a host
    gone meanwhile left for a reason nobody saw: `missed`."""
    found = {packet["hostname"]: packet for packet in now}
    events: list[tuple[str, Any]] = [("left", {"hostname": name, "reason": "missed"})
                                     for name in sorted(before) if name not in found]
    for name, packet in found.items():
        if name not in before:
            events.append(("joined", packet))
        elif sorted(packet.get("labels") or []) != sorted(before[name].get("labels") or []):
            events.append(("changed", packet))
    return events


def ctl_watch(options: CtlOptions, args: list[str], out: Any, paint: Painter) -> int:
    """lobbyctl watch: the answer, then each change, until interrupted (exit 0). When
    lobbyd goes away (a restart), it says so on stderr, tries again with backoff, and
    prints what changed meanwhile as events: no change is missed."""
    path = "/v1/events" + ctl_filter("watch", args)
    known: dict[str, Any] | None = None  # hostname -> packet, once a snapshot came
    delay = WATCH_RETRY[0]

    def show(event: str, data: Any) -> None:
        if options.json:
            out.write(compact_json({"event": event, "data": data}) + "\n")
        elif event == "snapshot":
            out.write(format_discoveries(data, paint) or "(no servers)\n")
        else:
            out.write(format_event(event, data, paint))

    try:
        while True:
            try:
                for event, data in ctl_events(options, path):
                    if event == "snapshot":
                        changes = [("snapshot", data)] if known is None else \
                            missed_events(known, data)
                        if known is not None:
                            print(f"lobbyctl: reconnected to lobbyd at {options.base}",
                                  file=sys.stderr, flush=True)
                        known = {packet["hostname"]: packet for packet in data}
                        delay = WATCH_RETRY[0]
                    else:
                        changes = [(event, data)]
                        if known is not None and event == "left":
                            known.pop(data.get("hostname"), None)
                        elif known is not None:
                            known[data["hostname"]] = data
                    for change in changes:
                        show(*change)
                    out.flush()
            except CtlError as exc:
                if known is None or "answered" in str(exc):
                    raise  # never reached, or refused: retrying would not help
                print(f"lobbyctl: {exc}; trying again in {delay:g}s", file=sys.stderr,
                      flush=True)
                time.sleep(delay)
                delay = min(delay * 2, WATCH_RETRY[1])
    except KeyboardInterrupt:
        return 0


def ctl_run(options: CtlOptions, words: list[str], out: Any, paint: Painter) -> int:
    """Run one command; the exit status."""
    from urllib.parse import quote

    command, args = words[0], words[1:]
    if command == "discoveries":
        path = "/v1/discoveries" + ctl_filter("discoveries", args)
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
        ctl_labels(options, words, out, paint)
    elif command == "watch":
        return ctl_watch(options, args, out, paint)
    else:
        raise CtlUsageError(f"unknown command or wrong arguments: {' '.join(words)}")
    return 0


def ctl_main(argv: Sequence[str], environ: Mapping[str, str], out: Any = None) -> int:
    """lobbyctl: parse, call the API, print; errors become exit statuses here only."""
    out = out or sys.stdout
    if list(argv) in (["--version"], ["-version"], ["-V"]):
        out.write(f"lobbyctl (lobbyd) {__version__}\n")
        return 0
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


###############################################################################
# The page (SPEC 12): one self-contained HTML document for people, served as it is.
# Its script is one more client of the API (/v1/health, /v1/events): no data is in
# the page, so it may be served without the token; everything it shows needs one.
###############################################################################

HTML_TYPE = "text/html; charset=UTF-8"
#: where the page always is, whatever the Accept header says: a link to share
PAGE_PATH = "/ui"


def page_headers(html: str) -> dict[str, str]:
    """No cache keeps an old page; nothing but this page's own script runs in it."""
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'sha256-{digest}'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")}


# The page: served byte for byte as it is here. Kept as a constant (like bottle's
# error page) so the module stays one file; the data comes from the API at run time.
PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>lobbyd</title>
<link rel="icon" href="data:,">
<style>
:root {
  --bg: #f5f6f8; --fg: #1b2230; --muted: #5d6878; --card: #fff; --line: #e1e5eb;
  --chip: #edf0f5; --accent: #2456d6; --ok: #16813d; --bad: #c0262d; --warn: #a85d00;
  --joined: #e3f6e8; --changed: #fdf3d8; --left: #fbe4e4; --focus: #2456d6;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0e1116; --fg: #e4e8ef; --muted: #98a2b3; --card: #161b23; --line: #262e3b;
    --chip: #222a37; --accent: #7aa7ff; --ok: #4ccf7a; --bad: #ff7a7a; --warn: #f5b544;
    --joined: #163524; --changed: #3a3016; --left: #3f1d20; --focus: #9dbdff;
  }
}
* { box-sizing: border-box; }
html, body { margin: 0; background: var(--bg); color: var(--fg); }
body { font: 15px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; }
header { position: sticky; top: 0; z-index: 2; background: var(--card);
         border-bottom: 1px solid var(--line); padding: 10px 16px; }
.bar, .tools, main { max-width: 1100px; margin: 0 auto; }
.bar { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: baseline; }
h1 { font-size: 18px; margin: 0; font-weight: 650; }
h1 span { font-weight: 400; color: var(--muted); }
#state { display: flex; flex-wrap: wrap; gap: 2px 16px; font-size: 13px; color: var(--muted);
         flex: 1 1 300px; }
#state b { color: var(--fg); font-weight: 600; }
.dot { display: inline-block; width: 8px; height: 8px; border-radius: 50%; margin-right: 6px;
       background: var(--muted); }
.dot.ok { background: var(--ok); } .dot.bad { background: var(--bad); }
.dot.warn { background: var(--warn); }
.tools { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-top: 10px; }
select, input, button { font: inherit; color: inherit; background: var(--bg);
                        border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; }
button { cursor: pointer; }
#filter { flex: 1 1 220px; min-width: 0; }
#count { font-size: 13px; color: var(--muted); white-space: nowrap; }
:focus-visible { outline: 2px solid var(--focus); outline-offset: 1px; }
kbd { font: 12px ui-monospace, monospace; border: 1px solid var(--line); border-radius: 4px;
      padding: 0 4px; }
#banner, #stale { display: none; max-width: 1100px; margin: 10px auto 0; padding: 8px 12px;
                  border-radius: 6px; background: var(--changed); font-size: 14px; }
#banner.on, #stale.on { display: block; }
main { padding: 10px 16px 48px; }
#list { position: relative; --row: 58px; }
.row { position: absolute; left: 0; right: 0; top: 0; height: var(--row); padding: 7px 12px;
       background: var(--card); border: 1px solid var(--line); border-top: 0;
       border-left: 3px solid transparent; overflow: hidden; }
.row.first { border-top: 1px solid var(--line); }
.row.joined { background: var(--joined); border-left-color: var(--ok); }
.row.changed { background: var(--changed); border-left-color: var(--warn); }
.row.left { background: var(--left); border-left-color: var(--bad); }
.row.left .host { text-decoration: line-through; }
.top { display: flex; gap: 12px; align-items: baseline; white-space: nowrap; }
.host { font-weight: 600; overflow: hidden; text-overflow: ellipsis; flex: 1 1 auto;
        font-family: ui-monospace, "SF Mono", Menlo, Consolas, monospace; font-size: 14px; }
.age { color: var(--muted); font-size: 12.5px; flex: none; }
.mark { font-size: 11px; font-weight: 700; text-transform: uppercase; letter-spacing: .04em; }
.joined .mark { color: var(--ok); } .changed .mark { color: var(--warn); }
.left .mark { color: var(--bad); }
.chips { margin-top: 4px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.chip { display: inline-block; margin: 0 5px 0 0; padding: 1px 8px; border-radius: 999px;
        border: 1px solid var(--line); background: var(--chip); font-size: 12.5px;
        line-height: 18px; }
.chip .k { color: var(--muted); }
.chip .k::after { content: ":"; }
.chip:hover { border-color: var(--accent); }
.empty { padding: 28px 12px; text-align: center; color: var(--muted); background: var(--card);
         border: 1px solid var(--line); }
#ask { display: none; max-width: 420px; margin: 48px auto; padding: 20px; background: var(--card);
       border: 1px solid var(--line); border-radius: 8px; }
#ask.on { display: block; }
#ask h2 { font-size: 17px; margin: 0 0 6px; }
#ask p { margin: 0 0 12px; color: var(--muted); font-size: 14px; }
#ask form { display: flex; gap: 8px; }
#ask input { flex: 1; min-width: 0; }
#why { color: var(--bad) !important; }
.hidden { display: none !important; }
@media (max-width: 600px) {
  header { position: static; padding: 8px 10px; } main { padding: 8px 8px 40px; }
  .age { font-size: 12px; } #count { flex-basis: 100%; }
  #list { --row: 82px; }
  .row { padding: 6px 10px; }
  .chips { white-space: normal; max-height: 46px; line-height: 23px; }
}
</style>
</head>
<body>
<header>
  <div class="bar">
    <h1>lobbyd <span id="self"></span></h1>
    <div id="state" role="status" aria-live="polite"><span><span class="dot"></span>
      connecting…</span></div>
    <button id="forget" class="hidden" type="button">Forget token</button>
  </div>
  <form class="tools" id="tools" role="search">
    <select id="mode" aria-label="Filter by">
      <option value="labels">labels</option><option value="prefixes">prefixes</option>
    </select>
    <input id="filter" type="search" autocomplete="off" spellcheck="false"
           placeholder="filter: service:web, location:dc1   (press / )"
           aria-label="Filter hosts by labels or label prefixes, comma-separated">
    <span id="count" aria-live="polite"></span>
  </form>
  <div id="banner" role="alert"></div>
  <div id="stale" role="alert"></div>
</header>
<section id="ask" aria-labelledby="ask-title">
  <h2 id="ask-title">This lobbyd needs its API token</h2>
  <p>It is kept in this tab only (sessionStorage) and sent as an
     <code>Authorization</code> header.</p>
  <p id="why"></p>
  <form id="token-form">
    <input id="token" type="password" autocomplete="off" aria-label="API token"
           placeholder="TOKEN">
    <button type="submit">Show hosts</button>
  </form>
</section>
<main id="main">
  <div id="list" role="list" aria-label="hosts"></div>
  <div id="empty" class="empty hidden"></div>
</main>
<script>
"use strict";
(() => {
  let ROW = 58;
  const OVERSCAN = 6, MARK_MS = 3000, SILENT_MS = 40000;
  const $ = (id) => document.getElementById(id);
  const list = $("list"), filterBox = $("filter"), modeBox = $("mode");
  const hosts = new Map();   // hostname -> {h, labels, seen, mark, at, v}
  let order = [];            // hostnames, sorted like the API sorts them
  let pending = [], flushing = false, drawing = false;
  let token = sessionStorage.getItem("lobbyd-token") || "";
  let needToken = false, gen = 0, ctl = null, retries = 0, lastByte = 0, live = "connecting";
  let skew = 0, health = null, healthError = "";
  let serial = 0;  // every state a host has had gets a new number: what a row shows
  const stats = {snapshotMs: null, firstRows: null, flushes: [], events: 0, seenPolls: [],
                 snapshots: 0, recent: []};
  window.lobbyStats = stats;

  // filter <-> URL ---------------------------------------------------------------
  const params = new URLSearchParams(location.search);
  let mode = params.get("labels") ? "labels" : params.get("prefixes") ? "prefixes" : "labels";
  let filterText = params.get(mode) || "";
  modeBox.value = mode;
  filterBox.value = filterText;
  const items = () => filterText.split(",").map((s) => s.trim()).filter(Boolean);
  function query() {
    const wanted = items().join(",");
    if (!wanted) return "";
    return "?" + mode + "=" + encodeURIComponent(wanted).replace(/%3A/gi, ":")
      .replace(/%2C/gi, ",").replace(/%2F/gi, "/");
  }
  let typing = 0;
  function setFilter(newMode, text) {
    mode = newMode; filterText = text; modeBox.value = mode;
    if (filterBox.value !== text) filterBox.value = text;
    history.replaceState(null, "", location.pathname + query());
    window.scrollTo(0, 0);
    follow();
  }
  filterBox.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => setFilter(modeBox.value, filterBox.value), 250);
  });
  modeBox.addEventListener("change", () => setFilter(modeBox.value, filterBox.value));
  $("tools").addEventListener("submit", (e) => {
    e.preventDefault(); clearTimeout(typing); setFilter(modeBox.value, filterBox.value);
  });
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const editing = t instanceof HTMLInputElement || t instanceof HTMLSelectElement;
    if (e.key === "/" && !editing && !e.ctrlKey && !e.metaKey && !e.altKey) {
      e.preventDefault(); filterBox.focus(); filterBox.select();
    } else if (e.key === "Escape" && t === filterBox) {
      if (filterBox.value) setFilter(mode, ""); else filterBox.blur();
    }
  });
  list.addEventListener("click", (e) => {
    const chip = e.target.closest(".chip");
    if (chip) { setFilter("labels", chip.dataset.label); filterBox.focus(); }
  });

  // talking to lobbyd ---------------------------------------------------------------
  const auth = () => (token ? {Authorization: "Token " + token} : {});
  function refused() {
    needToken = true; gen++;
    if (ctl) ctl.abort();
    hosts.clear(); order = []; pending = [];
    $("why").textContent = token ? "That token was refused." : "";
    $("ask").classList.add("on"); $("main").classList.add("hidden");
    $("tools").classList.add("hidden"); banner("");
    health = null; healthError = "waiting for the token"; showState(); draw();
    $("token").focus();
  }
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem("lobbyd-token", token);
    $("token").value = "";
    start();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem("lobbyd-token"); token = ""; refused();
  });

  function start() {
    needToken = false;
    $("ask").classList.remove("on"); $("main").classList.remove("hidden");
    $("tools").classList.remove("hidden"); $("forget").classList.toggle("hidden", !token);
    pollHealth(); follow();
  }

  async function pollHealth() {
    if (needToken) return;
    try {
      const r = await fetch("/v1/health", {headers: auth(), cache: "no-store"});
      if (r.status === 403) { refused(); return; }
      health = await r.json(); healthError = "";
    } catch (err) {
      health = null; healthError = "lobbyd does not answer";
    }
    showState();
  }

  // GET /v1/events through fetch(): EventSource cannot send the Authorization header,
  // and a token in the URL would end up in logs and in the browser's history.
  async function follow() {
    const mine = ++gen;
    if (ctl) ctl.abort();
    const me = ctl = new AbortController();
    if (needToken) return;
    setLive(live === "live" ? "connecting" : live);
    let r;
    try {
      r = await fetch("/v1/events" + query(), {headers: auth(), cache: "no-store",
                                               signal: me.signal});
    } catch (err) { again(mine); return; }
    if (r.status === 403) { refused(); return; }
    if (!r.ok || !r.body) {
      banner(r.status === 400 ? "lobbyd refused this filter: " + (await r.text()) : "");
      if (r.status !== 400) again(mine);
      return;
    }
    const reader = r.body.getReader(), text = new TextDecoder();
    let buf = "", from = 0;
    lastByte = Date.now();
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done || mine !== gen) break;
        lastByte = Date.now();
        buf += text.decode(value, {stream: true});
        let cut;
        while ((cut = buf.indexOf("\n\n", from)) >= 0) {
          event(buf.slice(0, cut)); buf = buf.slice(cut + 2); from = 0;
        }
        from = Math.max(0, buf.length - 1);
      }
    } catch (err) { /* aborted, or lobbyd went away: both end in again() */ }
    if (mine === gen) again(mine);
  }

  function again(mine) {
    if (mine !== gen || needToken) return;
    setLive("reconnecting");
    const wait = Math.min(5000, 250 * 2 ** retries++);
    setTimeout(() => { if (mine === gen) { pollHealth(); follow(); } }, wait);
  }

  setInterval(() => {  // a stream without even a keep-alive comment for 40 s is dead
    if (live === "live" && Date.now() - lastByte > SILENT_MS && ctl) ctl.abort();
  }, 5000);

  function event(block) {
    let name = "message", data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (!data.length) return;   // a keep-alive comment
    const value = JSON.parse(data.join("\n"));
    stats.recent.push([Date.now() % 100000, name, value.hostname || value.length]);
    if (stats.recent.length > 50) stats.recent.shift();
    if (name === "snapshot") snapshot(value);
    else { pending.push([name, value]); schedule(); }
  }

  // state ----------------------------------------------------------------------------
  const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
  function where(name) {
    let lo = 0, hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (order[mid] < name) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
  function noteClock(seen) {
    const ahead = seen - Date.now() / 1000;  // lobbyd's clock ahead of ours
    if (ahead > skew) skew = ahead;
  }

  function snapshot(packets) {
    const t0 = performance.now();
    pending = []; hosts.clear(); order = new Array(packets.length); stats.snapshots++;
    for (let i = 0; i < packets.length; i++) {
      const p = packets[i];
      hosts.set(p.hostname, {h: p.hostname, labels: p.labels, seen: p.last_check, mark: "",
                             at: 0, v: ++serial});
      order[i] = p.hostname;
      noteClock(p.last_check);
    }
    order.sort(cmp);
    retries = 0; banner(""); setLive("live");
    draw();
    stats.snapshotMs = performance.now() - t0;
    if (stats.firstRows === null && packets.length) {
      requestAnimationFrame(() => requestAnimationFrame(() => {
        stats.firstRows = performance.now();
      }));
    }
  }

  function schedule() {
    if (flushing) return;
    flushing = true;
    requestAnimationFrame(flush);
    setTimeout(flush, 250);   // a hidden tab gets no animation frames
  }

  function flush() {
    if (!flushing) return;
    flushing = false;
    const t0 = performance.now(), batch = pending, now = Date.now(), added = [];
    pending = [];
    for (const [name, d] of batch) {
      const old = hosts.get(d.hostname);
      if (name === "left") {
        if (old) Object.assign(old, {mark: "left", at: now, reason: d.reason, v: ++serial});
        continue;
      }
      noteClock(d.last_check);
      if (old) {
        const mark = name === "joined" || old.mark === "left" ? "joined" : "changed";
        Object.assign(old, {labels: d.labels, seen: d.last_check, mark, at: now, v: ++serial});
      } else {
        hosts.set(d.hostname, {h: d.hostname, labels: d.labels, seen: d.last_check,
                               mark: "joined", at: now, v: ++serial});
        added.push(d.hostname);
      }
    }
    if (added.length > 64) order = order.concat(added).sort(cmp);
    else for (const name of added) order.splice(where(name), 0, name);
    draw();
    stats.events += batch.length;
    if (stats.flushes.length < 100000) stats.flushes.push([batch.length, performance.now() - t0]);
  }

  setInterval(() => {   // once a second: ages, the end of marks, hosts that left
    const now = Date.now();
    let gone = false;
    for (const name of order) {
      const e = hosts.get(name);
      if (e.mark === "left" && now - e.at > MARK_MS) { hosts.delete(name); gone = true; }
    }
    if (gone) order = order.filter((name) => hosts.has(name));
    draw();
  }, 1000);

  // Keep-alives are no events: "heard N s ago" comes from the registry, every 5 s
  // (KEEP_ALIVE's default), or every N ms for N hosts: 10 s for 10k, a 40 ms parse.
  async function refreshAges() {
    setTimeout(refreshAges, Math.max(5000, hosts.size));
    if (needToken || live !== "live" || document.hidden) return;
    const mine = gen;
    try {
      const r = await fetch("/v1/discoveries" + query(), {headers: auth(), cache: "no-store"});
      if (r.status === 403) { refused(); return; }
      if (!r.ok) return;
      const t0 = performance.now(), packets = await r.json();
      if (mine !== gen) return;
      for (const p of packets) {
        const e = hosts.get(p.hostname);
        if (e && p.last_check > e.seen) e.seen = p.last_check;
        noteClock(p.last_check);
      }
      stats.seenPolls.push(performance.now() - t0);
    } catch (err) { /* the event stream notices and reconnects */ }
  }
  setTimeout(refreshAges, 5000);

  // drawing: only the rows on screen exist in the DOM ---------------------------------
  const rows = [];
  window.addEventListener("scroll", () => {
    if (!drawing) { drawing = true; requestAnimationFrame(() => { drawing = false; draw(); }); }
  }, {passive: true});
  function rowHeight() {  // CSS decides (taller rows on a phone, where chips wrap)
    ROW = parseFloat(getComputedStyle(list).getPropertyValue("--row")) || 58;
  }
  window.addEventListener("resize", () => { rowHeight(); draw(); });
  rowHeight();

  function ago(seen) {
    const s = Math.max(0, Math.round(Date.now() / 1000 + skew - seen));
    if (s < 90) return "heard " + s + " s ago";
    if (s < 5400) return "heard " + Math.round(s / 60) + " min ago";
    return "heard " + Math.round(s / 3600) + " h ago";
  }
  function chip(label) {
    const b = document.createElement("button");
    b.type = "button"; b.className = "chip"; b.dataset.label = label;
    b.title = "show the hosts with " + label;
    const cut = label.indexOf(":");
    if (cut > 0) {
      const k = document.createElement("span");
      k.className = "k"; k.textContent = label.slice(0, cut); b.append(k);
    }
    const v = document.createElement("span");
    v.className = "v"; v.textContent = cut > 0 ? label.slice(cut + 1) : label; b.append(v);
    return b;
  }
  function newRow() {
    const row = document.createElement("div");
    row.setAttribute("role", "listitem");
    row.setAttribute("aria-setsize", order.length);
    row.innerHTML = '<div class="top"><span class="host"></span><span class="mark"></span>' +
      '<span class="age"></span></div><div class="chips"></div>';
    row.parts = {host: row.querySelector(".host"), mark: row.querySelector(".mark"),
                 age: row.querySelector(".age"), chips: row.querySelector(".chips")};
    return row;
  }
  const MARKS = {joined: "new", changed: "changed", left: "left"};
  const REASONS = {goodbye: "said goodbye", expired: "went silent",
                   unmatched: "no longer matches"};

  function draw() {
    const now = Date.now(), total = order.length;
    const height = total * ROW + "px";
    if (list.style.height !== height) {
      list.style.height = height;
      for (const row of rows) row.setAttribute("aria-setsize", total);
    }
    const top = list.getBoundingClientRect().top;
    const first = Math.max(0, Math.floor(-top / ROW) - OVERSCAN);
    const last = Math.min(total, Math.ceil((window.innerHeight - top) / ROW) + OVERSCAN);
    const count = Math.max(0, last - first);
    while (rows.length < count) { const r = newRow(); rows.push(r); list.append(r); }
    while (rows.length > count) rows.pop().remove();
    for (let i = 0; i < count; i++) {
      const index = first + i, row = rows[i], e = hosts.get(order[index]);
      const mark = e.mark && now - e.at <= MARK_MS ? e.mark : "";
      if (row.host !== e.h || row.v !== e.v || row.mark !== mark || row.index !== index ||
          row.height !== ROW) {
        row.host = e.h; row.v = e.v; row.mark = mark; row.index = index; row.height = ROW;
        row.className = "row" + (index === 0 ? " first" : "") + (mark ? " " + mark : "");
        row.style.transform = "translateY(" + index * ROW + "px)";
        row.dataset.host = e.h;
        row.setAttribute("aria-posinset", index + 1);
        row.parts.host.textContent = e.h; row.parts.host.title = e.h;
        row.parts.mark.textContent = mark === "left" ? "left · " + (REASONS[e.reason] || "")
          : MARKS[mark] || "";
        row.parts.chips.replaceChildren(...e.labels.map(chip));
      }
      const age = ago(e.seen);
      if (row.parts.age.textContent !== age) row.parts.age.textContent = age;
    }
    let shown = 0;
    for (const e of hosts.values()) if (e.mark !== "left") shown++;
    const what = items().length ? " with " + mode + " " + items().join(", ") : "";
    $("count").textContent = live === "live" || total ? shown + (shown === 1 ? " host" : " hosts")
      + what : "";
    const empty = $("empty");
    empty.classList.toggle("hidden", total > 0 || live !== "live");
    empty.textContent = what ? "No host has " + (mode === "prefixes"
      ? "a label starting with " : "the label ") + items().join(" or ") + "."
      : "No hosts yet.";
  }

  // the daemon's own state --------------------------------------------------------------
  function when(unix) {
    return new Date(unix * 1000).toLocaleTimeString();
  }
  function relative(unix) {
    const s = Math.max(0, Math.round(Date.now() / 1000 + skew - unix));
    const rel = s < 90 ? s + " s" : s < 5400 ? Math.round(s / 60) + " min"
      : s < 172800 ? Math.round(s / 3600) + " h" : Math.round(s / 86400) + " days";
    return " (" + rel + " ago)";
  }
  // "(N s ago)" ticks every second (tick() below); hidden from screen readers, which
  // would otherwise hear the live region change every second: they get the time
  function agoSpan(unix) {
    const t = document.createElement("span");
    t.className = "ago"; t.dataset.since = unix; t.setAttribute("aria-hidden", "true");
    t.textContent = relative(unix);
    return t;
  }
  function tick() {
    for (const t of document.querySelectorAll("#state .ago, #stale .ago")) {
      const text = relative(Number(t.dataset.since));
      if (t.textContent !== text) t.textContent = text;
    }
  }
  function span(dot, html, since) {
    const s = document.createElement("span");
    const d = document.createElement("span");
    d.className = "dot " + dot; s.append(d);
    for (const [text, strong] of html) {
      const t = document.createElement(strong ? "b" : "span"); t.textContent = text; s.append(t);
    }
    if (since !== undefined) s.append(agoSpan(since));
    return s;
  }
  function setLive(state) { live = state; showState(); }
  function banner(text) {
    $("banner").textContent = text; $("banner").classList.toggle("on", !!text);
  }
  function showState() {
    const parts = [];
    if (live === "reconnecting") {
      parts.push(span("warn", [["reconnecting to lobbyd…", true]]));
      banner("Lost the connection to lobbyd; reconnecting… (the list shows the last state)");
    } else if (live === "live") parts.push(span("ok", [["live", false]]));
    else if (!needToken) parts.push(span("", [["connecting…", false]]));
    if (health) {
      $("self").textContent = "on " + health.hostname + " · v" + health.version;
      document.title = "lobbyd · " + health.hostname;
      for (const d of health.drivers || []) {
        parts.push(span(d.connected ? "ok" : "bad", d.connected
          ? [[d.driver + " connected", true], [" to " + (d.server || "?") +
             " since " + when(d.since), false]]
          : [[d.driver + " not connected", true],
             [(d.targets ? " to " + d.targets : "") + " since " + when(d.since), false]],
          d.since));
      }
    } else if (healthError) parts.push(span("bad", [[healthError, false]]));
    $("state").replaceChildren(...parts);
    showCut(health && health.cut_off_since);
  }
  // every transport lost: lobbyd answers with the fleet it last knew (X-Lobby-Stale)
  function showCut(since) {
    const el = $("stale");
    if (String(since || "") === (el.dataset.since || "")) return;
    el.dataset.since = since || "";
    el.classList.toggle("on", !!since);
    if (!since) { el.replaceChildren(); return; }
    const names = (health.drivers || []).map((d) => d.driver).join(" and ") || "the fleet";
    el.replaceChildren("Cut off from " + names + " since " + when(since),
                       agoSpan(since), ": showing the last known fleet");
  }
  setInterval(pollHealth, 5000);
  setInterval(tick, 1000);
  start();
})();
</script>
</body>
</html>
"""
PAGE_BYTES = PAGE_HTML.encode("utf-8")
PAGE_HEADERS = page_headers(PAGE_HTML)


if __name__ == "__main__":
    sys.exit(main())
