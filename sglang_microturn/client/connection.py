"""`HTTPConnection`: JSON requests to one server over httpx's pool of keep-alive connections, each answer
decoded into a reply or a typed error (client/errors.py).

Why httpx: a keep-alive connection must never hand a request the response to an earlier one. httpx (through
httpcore and h11) tracks each connection's request/response cycle and returns a connection to the pool only
once its response was read to the end; a request that fails, times out or is cancelled closes its
connection (the close is shielded from the cancellation). A late reply then goes to a closed socket, never to
the next caller, and the server sees the disconnect (a running append rolls back). httpx is also what
FastAPI's and Starlette's test clients use, so the tests already carry it, and it has no C extensions. The
client hand-rolled HTTP/1.1 over asyncio streams before; a timeout there left the late reply queued on the
connection and every later reply was off by one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from sglang_microturn.client.errors import ConnectionLostError, ProtocolError, RequestTimeoutError, error_from_response


class HTTPConnection:
    """JSON requests to the server at `base_url`. Owns one httpx.AsyncClient (its pool of keep-alive
    connections) from construction until `close()`; any number of requests may run at once, each on a
    connection of its own. `timeout_s` bounds connecting, sending, and each wait for response bytes.
    Proxies from the environment are not used (the server is usually on the same host or network)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http://host:port (or https://), got {base_url!r}")
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No cap on connections: each session keeps at most one request in flight, so the pool never holds
        # more connections than there are sessions; a cap would queue one session's turn behind others'.
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout_s),
                                       limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                                       trust_env=False)

    async def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """Send one request. Returns the decoded JSON reply, the text of a reply that is not JSON by its
        content type (SGLang's /freeze_gc answers text/plain), or None for an empty body. Raises the typed
        error of an error status, ConnectionLostError, RequestTimeoutError, or ProtocolError for a JSON reply
        that does not parse."""
        what = f"{method} {self.base_url}{path}"
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TimeoutException as e:
            raise RequestTimeoutError(f"{what}: no response within {self.timeout_s} s (timeout_s); the connection "
                                      "was closed") from e
        except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
            raise ConnectionLostError(f"{what}: the connection failed before a response came "
                                      f"({type(e).__name__}: {e})") from e
        text = response.text
        if response.status_code >= 400:
            raise error_from_response(response.status_code, text, response.headers.get("retry-after"))
        if not text.strip():
            return None
        if "json" not in response.headers.get("content-type", "").lower():
            return text
        try:
            return response.json()
        except ValueError:
            raise ProtocolError(f"{what}: HTTP {response.status_code} with a JSON body that does not parse: "
                                f"{text[:200]!r}", response.status_code, text) from None

    async def close(self) -> None:
        """Close every connection of the pool; a request still running on the server sees a disconnect."""
        await self._http.aclose()
