"""A lean HTTP/1.1 transport for httpx, for the one kind of server the gateway talks to: llama-server on a
plain TCP connection (no TLS, no proxy, no HTTP/2, no compression asked for).

httpx's own transport (httpcore, h11, anyio) parsed each streamed chunk through several layers and armed a
cancel scope for each read: per token it cost the web worker more CPU than relaying the bytes. Here a
connection is an asyncio.Protocol that collects what arrives; a streamed body is decoded (chunked or
Content-Length) straight from that buffer, everything complete passed on at once; the read timeout is one
timer per connection that re-arms itself only when it fires (no timer per read).

The rest of httpx stays (client, request, response, MockTransport in the tests), and so do its exceptions:
ConnectError, ConnectTimeout, ReadTimeout, WriteError, ReadError, RemoteProtocolError (a connection closed
before the answer's first byte says "Server disconnected without sending a response", as httpcore does), so
that Exchange.send's retry and error answers read the same."""

import asyncio
import time

import httpx

_MAX_HEAD = 64 * 1024
_DISCONNECTED = "Server disconnected without sending a response."
_MAX_BUFFER = 256 * 1024  # received and not yet read: past it, reading pauses


class _Connection(asyncio.Protocol):
    """One TCP connection: the bytes received and not yet read, whether it ended (and how), and the one
    reader waiting for more."""

    def __init__(self, key: tuple[str, int]):
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.error: Exception | None = None
        self.paused = False
        self.waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timeout = 0.0
        self.received_at = 0.0  # time.monotonic() of the last bytes, and of the start of the current wait
        self.waiting_since = 0.0
        self.idle_since = 0.0  # in the pool since

    # --- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        self.received_at = time.monotonic()
        if len(self.buffer) > _MAX_BUFFER and not self.paused:
            self.transport.pause_reading()  # the client reads slower than the server writes: wait for it
            self.paused = True
        self._wake()

    def eof_received(self):
        self.closed = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc):
        self.closed = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()

    def _wake(self):
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- reading ---------------------------------------------------------------------------------------

    async def more(self, timeout: float | None) -> None:
        """Wait until more bytes arrive or the connection ends (RemoteProtocolError or ReadError if it ended
        before this call, or with an error); httpx.ReadTimeout after `timeout` seconds with nothing received.
        One timer per connection, armed at the first wait and re-armed only when it fires early."""
        if self.closed:
            raise self._ended()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.waiting_since = time.monotonic()
        if timeout is not None and self.timer is None:
            self.timeout = timeout
            self.timer = loop.call_later(timeout, self._check_quiet)
        try:
            await self.waiter
        finally:
            self.waiter = None
        if self.error is not None and not self.buffer:
            raise self._ended()

    def _check_quiet(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms it again
        quiet = time.monotonic() - max(self.received_at, self.waiting_since)
        if quiet >= self.timeout:
            waiter.set_exception(httpx.ReadTimeout(f"no data from the server for {self.timeout:g}s"))
        else:
            self.timer = asyncio.get_running_loop().call_later(self.timeout - quiet, self._check_quiet)

    def _ended(self) -> Exception:
        if isinstance(self.error, OSError):
            return httpx.ReadError(str(self.error) or self.error.__class__.__name__)
        return httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self.closed = True
        self.stop_timer()
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    """A response body read from the connection: Content-Length, chunked, or until the server closes."""

    def __init__(self, transport: "LlamaTransport", conn: _Connection, length: int | None, chunked: bool,
                 keep: bool, timeout: float | None):  # fmt: skip
        self.transport, self.conn, self.length, self.chunked = transport, conn, length, chunked
        self.keep, self.timeout = keep, timeout
        self.complete = False  # the whole body has been received: set before its last piece is handed on

    def __aiter__(self):
        return self._chunks() if self.chunked else self._plain()  # the reader itself: no generator between

    async def _plain(self):
        conn, left = self.conn, self.length  # left None: until the server closes
        while left != 0:
            if not conn.buffer:
                if left is None and conn.closed:
                    break
                await conn.more(self.timeout)
                continue
            piece = bytes(conn.buffer if left is None else conn.buffer[:left])
            del conn.buffer[: len(piece)]
            if left is not None:
                left -= len(piece)
                self.complete = left == 0  # before the last piece goes: the reader may ask (`complete`)
            yield piece
        self.complete = left == 0

    async def _chunks(self):
        conn = self.conn
        buffer = conn.buffer
        while True:
            out = []
            position = 0
            done = False
            while True:  # every chunk that is whole in the buffer, passed on at once
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    break
                size_text = bytes(buffer[position:line_end]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"malformed chunk size {size_text[:20]!r}") from None
                if size == 0:
                    trailer_end = buffer.find(b"\r\n\r\n", line_end)  # no trailers: "0\r\n\r\n"
                    if trailer_end < 0:
                        break
                    position = trailer_end + 4
                    done = True
                    break
                start = line_end + 2
                if len(buffer) < start + size + 2:
                    break
                out.append(bytes(buffer[start : start + size]))
                position = start + size + 2
            if position:
                del buffer[:position]
            self.complete = done  # before the last piece goes: the reader may ask (`complete`)
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
            if done:
                return
            await conn.more(self.timeout)

    async def aclose(self) -> None:
        if self.complete and self.keep and not self.conn.closed and not self.conn.buffer:
            self.transport.release(self.conn)
        else:
            self.conn.close()


class LlamaTransport(httpx.AsyncBaseTransport):
    """httpx transport: HTTP/1.1 over plain TCP, idle connections kept per (host, port) for
    `keepalive_expiry` seconds, at most `max_keepalive` of them (0: a new connection for every request)."""

    def __init__(self, *, max_keepalive: int = 64, keepalive_expiry: float = 2.0):
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self.idle: dict[tuple[str, int], list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        payload = await request.aread()
        return await self._exchange(
            request.url,
            request.method,
            _request_head(request.method, request.url.raw_path, request.headers.raw) + payload,
            request.extensions.get("timeout"),
        )

    async def send(
        self, method: str, url: httpx.URL, headers: dict[str, str], content: bytes, timeouts: dict
    ) -> httpx.Response:
        """`handle_async_request` without an httpx.Request: the same bytes on the wire (httpx adds Host and
        Content-Length to a request built without a client, nothing more), written straight from the
        arguments. Building the httpx.Request and its headers cost more than the rest of the way out."""
        pairs = [(b"Host", url.netloc)]
        pairs += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        if content or method in ("POST", "PUT", "PATCH"):
            pairs.append((b"Content-Length", str(len(content)).encode("ascii")))
        head = _request_head(method, url.raw_path, pairs)
        return await self._exchange(url, method, head + content, timeouts)

    async def _exchange(
        self, url: httpx.URL, method: str, data: bytes, timeouts: dict | None
    ) -> httpx.Response:
        """`data` (the request's head and body) sent to `url`'s server, on a kept connection or a new one;
        the answer's head read, its body left to read (a stream on the connection)."""
        timeouts = timeouts or {}
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"only http:// is served by this transport, not {url.scheme}")
        key = (url.host, url.port or 80)
        conn = self._idle_connection(key)
        if conn is None:
            conn = await self._connect(key, timeouts.get("connect"))
        try:
            conn.transport.write(data)
        except Exception as exc:  # a transport that broke just now
            conn.close()
            raise httpx.WriteError(str(exc) or exc.__class__.__name__) from None
        try:
            status, headers, http10 = await _read_head(conn, timeouts.get("read"))
        except BaseException:
            conn.close()
            raise
        length, chunked, keep = _framing(headers, method, status)
        conn.stop_timer()  # the body's reads arm it again, with the same timeout
        body = _Body(self, conn, length, chunked, keep and not http10, timeouts.get("read"))
        return httpx.Response(status, headers=headers, stream=body, extensions={"http_version": b"HTTP/1.1"})

    def _idle_connection(self, key) -> _Connection | None:
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used first
            if not conn.closed and not conn.buffer and now - conn.idle_since < self.keepalive_expiry:
                return conn
            conn.close()
        return None

    async def _connect(self, key, timeout) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(key), key[0], key[1])
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {key[0]}:{key[1]} within {timeout:g}s") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or exc.__class__.__name__) from None
        return conn

    def release(self, conn: _Connection) -> None:
        """A connection whose answer was read to its end: kept for the next request, or closed."""
        conn.stop_timer()
        idle = self.idle.setdefault(conn.key, [])
        now = time.monotonic()
        for stale in [c for c in idle if c.closed or now - c.idle_since >= self.keepalive_expiry]:
            idle.remove(stale)
            stale.close()
        if len(idle) >= self.max_keepalive:
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    async def aclose(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.idle.clear()


def _request_head(method: str, raw_path: bytes, headers) -> bytes:
    """A request's head: its line and `headers`, (name, value) pairs of bytes, in their order."""
    lines = [method.encode("ascii") + b" " + raw_path + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _read_head(conn: _Connection, timeout) -> tuple[int, list[tuple[bytes, bytes]], bool]:
    """The status, the headers and whether the server spoke HTTP/1.0 (no keep-alive then)."""
    while True:
        end = conn.buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(conn.buffer) > _MAX_HEAD:
            raise httpx.RemoteProtocolError("the response's head is too large")
        if conn.closed and not conn.buffer:
            raise httpx.RemoteProtocolError(_DISCONNECTED)
        try:
            await conn.more(timeout)
        except httpx.RemoteProtocolError:
            message = _DISCONNECTED if not conn.buffer else "incomplete response head"
            raise httpx.RemoteProtocolError(message) from None
        except httpx.ReadError as exc:
            if conn.buffer:
                raise
            raise httpx.RemoteProtocolError(f"{_DISCONNECTED} ({exc})") from None
    head = bytes(conn.buffer[:end])
    del conn.buffer[: end + 4]
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"malformed status line {status_line[:60]!r}")
    headers = []
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx.RemoteProtocolError(f"malformed header line {line[:60]!r}")
        headers.append((name.strip(), value.strip()))
    return int(parts[1]), headers, parts[0] == b"HTTP/1.0"


def _framing(headers, method: str, status: int) -> tuple[int | None, bool, bool]:
    """(Content-Length or None, chunked, whether the connection may be kept) of a response."""
    length = None
    chunked = False
    keep = True
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            length = int(value) if value.isdigit() else None
        elif lower == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lower == b"connection":
            keep = keep and b"close" not in value.lower()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return 0, False, keep
    if chunked:
        return None, True, keep
    if length is None:
        keep = False  # the body ends when the server closes
    return length, False, keep
