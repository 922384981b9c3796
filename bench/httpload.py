"""HTTP load: wrk when it is installed, else a small asyncio fallback with the same output.

Both return {"rps", "p50_ms", "p90_ms", "p99_ms", "requests", "errors", "bytes_per_req",
"tool"}. wrk (Debian package `wrk`) is the reference tool; the fallback is a
keep-alive HTTP/1.1 client in one process and tops out far lower, so its figures
are marked `tool: python-fallback`.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, object]:
    res: dict[str, object] = {"tool": "wrk"}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_ms"] = round(_ms(m.group(1)), 3)
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    errs = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errs += sum(int(x) for x in m.groups())
    res["errors"] = errs
    m = re.search(r"requests in [\d.]+\w+, ([\d.]+)(\w+) read", out)
    if m and res["requests"]:
        scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}.get(m.group(2), 1)
        res["bytes_per_req"] = int(float(m.group(1)) * scale / int(res["requests"]))
    return res


def run_wrk(port: int, path: str, conns: int, seconds: float,
            headers: dict[str, str] | None = None) -> dict[str, object]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
           "--timeout", "10s"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    res = parse_wrk(out)
    res["raw"] = out
    return res


async def _worker(port: int, req: bytes, until: float, lat: list[float], stats: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if m:
                size = int(m.group(1))
                await reader.readexactly(size)
            else:  # HTTP/1.0 style: the body ends with the connection
                size = len(await reader.read())
            lat.append((time.perf_counter() - t0) * 1e3)
            stats["bytes"] += size
            if status != 200:
                stats["errors"] += 1
            if not m or re.search(rb"(?i)\r\nconnection:\s*close", head) or \
                    head.startswith(b"HTTP/1.0"):
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        stats["errors"] += 1
    finally:
        writer.close()


def run_fallback(port: int, path: str, conns: int, seconds: float,
                 headers: dict[str, str] | None = None) -> dict[str, object]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()
    lat: list[float] = []
    stats = {"bytes": 0, "errors": 0}

    async def main() -> float:
        t0 = time.monotonic()
        until = t0 + seconds
        await asyncio.wait_for(
            asyncio.gather(*(_worker(port, req, until, lat, stats) for _ in range(conns))),
            timeout=seconds + 30)
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 3) if lat else 0.0

    return {"tool": "python-fallback", "rps": len(lat) / elapsed, "p50_ms": pct(50),
            "p90_ms": pct(90), "p99_ms": pct(99), "requests": len(lat),
            "errors": stats["errors"], "bytes_per_req": stats["bytes"] // max(1, len(lat))}


def http_load(port: int, path: str, conns: int, seconds: float,
              headers: dict[str, str] | None = None) -> dict[str, object]:
    if shutil.which("wrk"):
        return run_wrk(port, path, conns, seconds, headers)
    return run_fallback(port, path, conns, seconds, headers)
