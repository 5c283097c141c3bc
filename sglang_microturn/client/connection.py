"""`HTTPConnection`: JSON requests to one server over aiohttp's pool of keep-alive connections, each answer
decoded into a reply or a typed error (client/errors.py).

Why aiohttp: a keep-alive connection must never hand a request the response to an earlier one. aiohttp puts
a connection back in its pool only once its response was read to the end, and a request that fails, times
out or is cancelled closes its connection; a late reply then goes to a closed socket, never to the next
caller, and the server sees the disconnect (a running append rolls back). It costs less per request than
httpx (a C HTTP parser): on loopback against a stand-in server in the same process, ~0.3 ms a request
against httpx's ~0.8 ms, which matters for one process pacing many sessions at 200 ms. It never resends a
POST by itself (only idempotent methods, on a reused connection). The client
hand-rolled HTTP/1.1 over asyncio streams before; a timeout there left the late reply queued on the
connection and every later reply was off by one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from sglang_microturn import protocol
from sglang_microturn.client.errors import (
    ConnectionLostError,
    GatewayRouteError,
    ProtocolError,
    RequestTimeoutError,
    error_from_response,
)


class HTTPConnection:
    """JSON requests to the server at `base_url`. Owns one aiohttp.ClientSession (its pool of keep-alive
    connections) from the first request until `close()`; any number of requests may run at once, each on a
    connection of its own. `timeout_s` bounds each request, from connecting to its whole response. Proxies
    from the environment are not used (the server is usually on the same host or network)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http://host:port (or https://), got {base_url!r}")
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http: aiohttp.ClientSession | None = None  # made in the event loop that uses it

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            # No cap on connections: each session keeps at most one request in flight, so the pool never holds
            # more connections than there are sessions; a cap would queue one session's turn behind others'.
            self._http = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        return self._http

    async def request(self, method: str, path: str, body: dict | None = None,
                      headers: dict[str, str] | None = None) -> Any:
        """Send one request (with `headers` besides the connection's own). Returns the decoded JSON reply, the
        text of a reply that is not JSON by its content type (SGLang's /freeze_gc answers text/plain), or None
        for an empty body. Raises the typed error of an error status, GatewayRouteError for a gateway's 404 of
        a route it does not forward, ConnectionLostError, RequestTimeoutError, or ProtocolError for a JSON
        reply that does not parse."""
        what = f"{method} {self.base_url}{path}"
        try:
            async with self._session().request(method, self.base_url + path, json=body,
                                               headers=headers) as response:
                try:
                    raw = await response.read()
                except BaseException:
                    response.close()  # a response not read to the end: its connection is never reused
                    raise
                status, reply_headers = response.status, response.headers
        except asyncio.TimeoutError as e:
            raise RequestTimeoutError(f"{what}: no response within {self.timeout_s} s (timeout_s); the connection "
                                      "was closed") from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise ConnectionLostError(f"{what}: the connection failed before a whole response came "
                                      f"({type(e).__name__}: {e})") from e
        text = raw.decode("utf-8", errors="replace")
        if status == 404 and reply_headers.get(protocol.GATEWAY_ERROR_HEADER) == protocol.GATEWAY_UNKNOWN_ROUTE:
            raise GatewayRouteError(f"{what}: the gateway forwards no such route", status, text)
        if status >= 400:
            raise error_from_response(status, text, reply_headers.get("Retry-After"))
        if not text.strip():
            return None
        if "json" not in reply_headers.get("Content-Type", "").lower():
            return text
        try:
            return json.loads(text)
        except ValueError:
            raise ProtocolError(f"{what}: HTTP {status} with a JSON body that does not parse: {text[:200]!r}",
                                status, text) from None

    async def close(self) -> None:
        """Close every connection of the pool; a request still running on the server sees a disconnect."""
        if self._http is not None:
            await self._http.close()
            self._http = None
