#!/usr/bin/env python3
"""Sends one GET on each of N fresh connections at the same moment and prints time to first byte.

    bench/stampede.py --port PORT --path /slow/bundle-1m.json [--host open.bench] [-n 200]

All N connections to 127.0.0.1:PORT are opened first; then every request is written in one
pass of the event loop. Each response is read to its end (Content-Length). Prints one JSON
object: counts by status, responses whose body length was wrong, and the time to first byte
(from that request's write to the first response byte) as p50, p99 and max in milliseconds.
Gives up after --timeout seconds (default 30) and counts unfinished requests as "timeout".
"""

import argparse
import asyncio
import json
import sys
import time


async def main() -> int:
    parser = argparse.ArgumentParser(description="cold-cache stampede on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--host", default="127.0.0.1", help="Host header")
    parser.add_argument("-n", type=int, default=200, help="concurrent requests")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole run")
    args = parser.parse_args()

    connections = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", args.port) for _ in range(args.n))
    )
    request = (
        "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bench-stampede\r\n\r\n" % (args.path, args.host)
    ).encode()
    tasks = [asyncio.create_task(fetch(reader, writer, request)) for reader, writer in connections]
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for task in pending:
        task.cancel()
    for _, writer in connections:
        writer.close()

    results = [task.result() for task in done if task.exception() is None]
    failed = [repr(task.exception()) for task in done if task.exception() is not None]
    ttfb = sorted(r["ttfb_ms"] for r in results)
    statuses = {}
    for r in results:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    report = {
        "requests": args.n,
        "statuses": statuses,
        "short_bodies": sum(1 for r in results if not r["complete"]),
        "errors": len(failed),
        "first_error": failed[0] if failed else None,
        "timeout": len(pending),
        "ttfb_ms": {
            "p50": percentile(ttfb, 50),
            "p99": percentile(ttfb, 99),
            "max": ttfb[-1] if ttfb else None,
        },
    }
    print(json.dumps(report))
    return 0


async def fetch(reader, writer, request: bytes) -> dict:
    """Writes the request, then reads one response; returns status, TTFB and completeness."""
    writer.write(request)
    started = time.perf_counter()
    first = await reader.read(1)
    ttfb_ms = (time.perf_counter() - started) * 1000
    if not first:
        raise ConnectionError("connection closed before the response")
    head = first + await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ")[1]
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        complete = await read_chunked(reader)
    else:
        length = int(fields.get("content-length", "0"))
        complete = await read_exactly(reader, length) == length
    return {"status": status, "ttfb_ms": round(ttfb_ms, 1), "complete": complete}


async def read_exactly(reader, length: int) -> int:
    """Reads up to `length` body bytes; returns how many arrived before the connection ended."""
    received = 0
    while received < length:
        chunk = await reader.read(min(1 << 20, length - received))
        if not chunk:
            break
        received += len(chunk)
    return received


async def read_chunked(reader) -> bool:
    """Reads a chunked body to its last chunk; returns whether every chunk arrived whole."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return True
        if await read_exactly(reader, size + 2) != size + 2:
            return False


def percentile(sorted_values: list, pct: int):
    """Returns the nearest-rank percentile of an ascending list, or None when it is empty."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[rank - 1]


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
