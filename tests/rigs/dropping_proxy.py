"""A TCP proxy for HTTP/1.1 that drops connections on cue, for tests of what a client does when a connection
dies mid-request: `DroppingProxy(upstream_port, plan)` runs in the test's event loop; `plan(method, path,
body)` says, per request:

  relay              pass the request up and the response back
  drop_after_reply   the server answered; the client never sees it (its connection closes)
  drop_before_reply  both sides close as soon as the request went up: the server sees a disconnect
  drop_request       the client's connection closes; the request never reaches the server
  late_request       the client's connection closes at once; the request reaches the server LATE_S later
                     on a connection of its own (a copy stuck in the network), its status kept in
                     `late_statuses`

Every request the client sent is kept in `requests` as (method, path, parsed JSON body or None).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

Plan = Callable[[str, str, dict | None], str]


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 message with a Content-Length body (ours and uvicorn's are): (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


LATE_S = 0.3


class DroppingProxy:
    def __init__(self, upstream_port: int, plan: Plan):
        self.upstream_port, self.plan = upstream_port, plan
        self.requests: list[tuple[str, str, dict | None]] = []
        self.dropped = 0
        self.late_statuses: list[int] = []
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def settled(self) -> None:
        """Wait for every late copy to have reached the server and been answered."""
        while any(t.get_name() == "late" and not t.done() for t in self._tasks):
            await asyncio.sleep(0.01)

    async def _serve(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._relay(client_reader, client_writer)
        except asyncio.CancelledError:
            pass  # the proxy is closing
        finally:
            self._tasks.discard(task)

    async def _late(self, raw: bytes) -> None:
        await asyncio.sleep(LATE_S)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        writer.write(raw)
        await writer.drain()
        head, _ = await _read_message(reader)
        self.late_statuses.append(int(head.split(b" ")[1]))
        writer.close()

    async def _relay(self, client_reader, client_writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            while True:
                try:
                    head, body = await _read_message(client_reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, path = head.split(b" ")[:2]
                parsed = json.loads(body) if body else None
                self.requests.append((method.decode(), path.decode(), parsed))
                action = self.plan(method.decode(), path.decode(), parsed)
                if action in ("drop_request", "late_request"):
                    self.dropped += 1
                    if action == "late_request":
                        late = asyncio.get_running_loop().create_task(self._late(head + body), name="late")
                        self._tasks.add(late)
                    return
                up_writer.write(head + body)
                await up_writer.drain()
                if action == "drop_before_reply":
                    self.dropped += 1
                    return
                reply_head, reply_body = await _read_message(up_reader)
                if action == "drop_after_reply":
                    self.dropped += 1
                    return
                client_writer.write(reply_head + reply_body)
                await client_writer.drain()
        finally:
            for w in (client_writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
