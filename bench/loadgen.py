"""The load generator of bench.serve: keep-alive HTTP/1.1 clients as light as asyncio allows,
and a trivial server that measures what those clients cost on their own.

The clients run in the benchmark's process, on the cores the servers use, so whatever they
spend is taken from the server under test. httpx spent about as much per request as a server's
whole request path; these clients write one request, read the status line, the headers and a
Content-Length (or chunked) body, and decode JSON with orjson. Every server gets the same
client. `python -m bench.loadgen PORT` serves the trivial endpoint: it answers every POST with
one 384-float row per input of the request, parsed from the body, so the client's work per
request (send, receive, decode) matches a real server's.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

try:  # the same event loop as the servers' uvicorn, when installed
    import uvloop
except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
    uvloop = None


def run(coroutine: Any) -> Any:
    """asyncio.run on uvloop when it is installed."""
    if uvloop is not None:
        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


class Connection:
    """One keep-alive HTTP/1.1 connection that sends JSON POSTs, one at a time."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = (f"Host: {host}:{port}\r\nContent-Type: application/json\r\n"
                      f"Accept: application/json\r\n{extra}").encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one POST; reconnects when the server closed the connection."""
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\n" + self._head
                     + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            payload = b"".join(parts)
        else:
            payload = await reader.readexactly(length or 0)
        if close:
            writer.close()
        return status, payload

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@dataclass
class Run:
    seconds: float
    latencies: list[float]
    errors: int
    inputs: int
    vectors: dict[int, np.ndarray]
    client_cpu_s: float  # CPU time of this process (the clients) during the run


async def drive(url: str, make_body: Callable[[list[str]], Any],
                decode: Callable[[Any], list[np.ndarray]], texts: list[str], per_request: int,
                clients: int, headers: dict[str, str]) -> Run:
    """Send `texts` in requests of `per_request` from `clients` concurrent connections."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    path = "/" + path
    chunks = [(i, texts[i:i + per_request]) for i in range(0, len(texts), per_request)]
    chunks.reverse()  # pop() from the end takes them in order
    latencies: list[float] = []
    vectors: dict[int, np.ndarray] = {}
    errors = 0
    connections = [Connection(host, int(port), headers) for _ in range(clients)]

    async def worker(connection: Connection) -> None:
        nonlocal errors
        while chunks:
            start, chunk = chunks.pop()
            body = orjson.dumps(make_body(chunk))
            began = time.perf_counter()
            try:
                status, payload = await connection.post(path, body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status, payload = 0, b""
                connection.close()
            latencies.append(time.perf_counter() - began)
            if status != 200:
                errors += 1
                continue
            for j, row in enumerate(decode(orjson.loads(payload))):
                vectors[start + j] = row

    cpu = time.process_time()
    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    seconds = time.perf_counter() - began
    return Run(seconds, latencies, errors, len(texts), vectors, time.process_time() - cpu)


def summary(runs: list[Run], expected: np.ndarray | None) -> dict[str, Any]:
    """Throughput (mean over the runs), pooled latency percentiles, errors, client CPU, and the
    largest difference to the expected vectors."""
    lat = sorted(x for r in runs for x in r.latencies)
    requests = len(lat)
    row: dict[str, Any] = {
        "inputs_per_s": statistics.fmean(r.inputs / r.seconds for r in runs),
        "runs_inputs_per_s": [r.inputs / r.seconds for r in runs],
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "errors": sum(r.errors for r in runs),
        "requests": requests,
        "client_cpu_ms_per_request": (1000 * sum(r.client_cpu_s for r in runs) / requests
                                      if requests else None),
    }
    if expected is not None:
        diffs = []
        answered = 0
        for r in runs:
            if r.vectors:
                index = sorted(r.vectors)
                got = np.stack([r.vectors[i] for i in index])
                diffs.append(float(np.abs(got - expected[index]).max()))
                answered += len(index)
        row["max_abs_diff"] = max(diffs) if diffs else None
        row["answered"] = answered
    return row


# --------------------------------------------------------------------------------------------
# The trivial endpoint


class _Trivial(asyncio.Protocol):
    """Answers each POST with `{"data": [{"index": i, "embedding": ROW}, ...]}`, one row per
    input of the request (`inputs` or `input`)."""

    ROW = orjson.dumps([0.01 * (i % 97) for i in range(384)])

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = orjson.loads(self.buffer[end + 4:end + 4 + length] or b"{}")
            self.buffer = self.buffer[end + 4 + length:]
            inputs = body.get("inputs", body.get("input", [""]))
            count = 1 if isinstance(inputs, str) else len(inputs)
            rows = b",".join(b'{"index":%d,"embedding":%s}' % (i, self.ROW)
                             for i in range(count))
            payload = b'{"data":[' + rows + b"]}"
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(payload), payload))


async def serve_trivial(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Trivial, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    run(serve_trivial(int(sys.argv[1])))
