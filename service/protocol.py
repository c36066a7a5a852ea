"""uvicorn's HTTP protocol with a deadline for the request head: a guard against slow clients.

uvicorn bounds idle keep-alive connections (``--timeout-keep-alive``) but not a client that sends
its request line and headers a byte at a time, so 200 such "slowloris" connections hold 200 sockets
forever. This subclass of the httptools protocol answers 408 and closes a connection whose head is
not complete within ``RECSYS_HEADER_TIMEOUT_S``; a stalled body is the app's concern (408 from
``service.http.BodyLimit``). Use it with ``uvicorn service.app:app --http service.protocol:HeadDeadline``.
In production a reverse proxy (nginx, deploy/nginx.conf) fronts the service as well.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import get_settings


class HeadDeadline(HttpToolsProtocol):
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection gets its own deadline
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(get_settings().header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request is being served: its head arrived in time
        body = b'{"error":"request head not received in time"}'
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()
