"""Hostile answers for the bundled upstream: what a broken or malicious server sends.

Each is served by `LocalUpstream` under its path (GET, query parameters optional):
- `/stall-body`: headers and 10 bytes of a 1000-byte body, then nothing;
- `/slow-headers?interval=1`: the status line and headers, one byte every `interval` seconds;
- `/huge?mb=50`: a body of `mb` megabytes, with its Content-Length;
- `/gzip-bomb?gb=4`: a gzip body that inflates to `gb` gigabytes of zeros (4 MB on the wire);
- `/bad-json`: `application/json` that is not JSON;
- `/json?kind=nan|infinity|big|surrogate|deep` (`&depth=50000`): JSON Python reads but cannot write back;
- `/many-headers?n=10000`: that many response headers;
- `/fat-headers?n=90&size=4000`: `n` headers of `size` bytes each (a head both clients take);
- `/non-utf8`: a text body and a header value that are not UTF-8;
- `/quotes?n=262144`: a text body of `n` double quotes (each escaped twice on its way to the caller);
- `/encoded?as=gzip|deflate|raw-deflate|br` (`&bad=1`): "hello, encoded" with that Content-Encoding,
  whether asked for or not (`br` is never asked for, and is sent as is), or bytes that do not decode.
"""

from __future__ import annotations

import asyncio
import zlib
from functools import cache

_MEGABYTE = b"h" * (1 << 20)


@cache
def _gzip_member() -> bytes:
    """One gzip member holding 64 MiB of zeros: about 64 KB. Members concatenate into one gzip body."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    chunk = bytes(1 << 20)
    return b"".join([*(compressor.compress(chunk) for _ in range(64)), compressor.flush()])


def _encoded(body: bytes, encoding: str) -> bytes:
    """`body` compressed as `encoding` says; for `br`, the body as is (a client must not decode what it did
    not ask for)."""
    wbits = {"gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS, "raw-deflate": -zlib.MAX_WBITS}
    if encoding not in wbits:
        return body
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits[encoding])
    return compressor.compress(body) + compressor.flush()


def _head(status: str, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    lines.append(f"connection: {'keep-alive' if keep_alive else 'close'}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_body(kind: str, depth: int) -> bytes:
    bodies = {
        "nan": b'{"price": NaN, "ok": true}',
        "infinity": b"[Infinity, -Infinity, 1]",
        "big": b'{"x": 1e400}',
        "surrogate": b'{"name": "\\ud800 alone"}',
        "deep": b"[" * depth + b"]" * depth,
    }
    return bodies[kind]


async def answer(path: str, query: dict[str, str], writer: asyncio.StreamWriter, keep_alive: bool) -> bool | None:
    """Serve a hostile path; None if `path` is not one of them, False when the connection is to be dropped."""
    try:
        return await _answer(path, query, writer, keep_alive)
    except ConnectionError:
        return False  # the client gave up, as it should


async def _answer(path: str, query: dict[str, str], writer: asyncio.StreamWriter, keep_alive: bool) -> bool | None:
    if path == "/stall-body":
        writer.write(_head("200 OK", [("content-type", "text/plain"), ("content-length", "1000")], keep_alive))
        writer.write(b"s" * 10)
        await writer.drain()
        await asyncio.sleep(3600)
        return False
    if path == "/slow-headers":
        interval = float(query.get("interval", "1"))
        for byte in _head("200 OK", [("content-type", "text/plain"), ("content-length", "2")], keep_alive) + b"ok":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(interval)
        return True
    if path == "/huge":
        size = int(float(query.get("mb", "50")) * (1 << 20))
        writer.write(_head("200 OK", [("content-type", "text/plain"), ("content-length", str(size))], keep_alive))
        for start in range(0, size, len(_MEGABYTE)):
            writer.write(_MEGABYTE[: size - start])
            await writer.drain()
        return True
    if path == "/gzip-bomb":
        member = _gzip_member()
        members = int(float(query.get("gb", "4")) * 16)
        headers = [("content-type", "application/json"), ("content-encoding", "gzip")]
        headers.append(("content-length", str(len(member) * members)))
        writer.write(_head("200 OK", headers, keep_alive))
        for _ in range(members):
            writer.write(member)
            await writer.drain()
        return True
    if path in ("/bad-json", "/json", "/non-utf8", "/quotes"):
        if path == "/bad-json":
            body, headers = b'{"a": [1, 2', [("content-type", "application/json")]
        elif path == "/json":
            body = _json_body(query.get("kind", "nan"), int(query.get("depth", "50000")))
            headers = [("content-type", "application/json")]
        elif path == "/non-utf8":
            body, headers = b"caf\xe9 \xff\xfe", [("content-type", "text/plain"), ("x-legacy", "caf\xe9")]
        else:
            body, headers = b'"' * int(query.get("n", "262144")), [("content-type", "text/plain")]
        writer.write(_head("200 OK", [*headers, ("content-length", str(len(body)))], keep_alive) + body)
        return True
    if path == "/encoded":
        encoding = query.get("as", "gzip")
        body = b"not compressed at all" if query.get("bad") else _encoded(b"hello, encoded", encoding)
        headers = [("content-type", "text/plain"), ("content-encoding", encoding.removeprefix("raw-"))]
        writer.write(_head("200 OK", [*headers, ("content-length", str(len(body)))], keep_alive) + body)
        return True
    if path in ("/many-headers", "/fat-headers"):
        count = int(query.get("n", "10000" if path == "/many-headers" else "90"))
        value = "v" * int(query.get("size", "1" if path == "/many-headers" else "4000"))
        headers = [(f"x-h{index}", value) for index in range(count)]
        writer.write(_head("200 OK", [*headers, ("content-length", "0")], keep_alive))
        return True
    return None
