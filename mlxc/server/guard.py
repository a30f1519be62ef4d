"""What a web page in the user's browser must not be able to do to a local server, and the
request body's deadline. Pure ASGI middleware, outermost, so refusals cost no parsing.

- Host allow-list: loopback names, IP addresses, this machine's name when bound to every
  interface, and `--allowed-hosts`. A DNS-rebinding page reaches 127.0.0.1 under its own
  name, so a foreign name is refused (`403`).
- Origin: browsers send it on cross-site requests (and on every POST); one that is not this
  server itself (`http://` and its Host: `https://` or `ws://` there is another origin) nor
  named by `--cors` is refused (`403`), so a page cannot use the API with the user's network
  position. `--cors` also answers preflights (Starlette's CORS).
- Content-Type: a body must be `application/json` (`415`). A cross-site form or
  `fetch(..., {mode: "no-cors"})` can send `text/plain` without a preflight; JSON cannot.
- `/metrics` needs the API key when one is set (`/health` then shows only the basics).
- The whole body must arrive within `body_timeout` seconds of the head (`408`, and the
  connection is closed), and each piece of the reply must be taken by the client within as
  long: a half-sent body or an unread stream must not hold a connection forever.

Each refusal is in the API's own error shape; the log says each cause once a minute.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxc.server.errors import ApiError, error_response
from mlxc.server.limits import Throttle

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")
BODY_METHODS = ("POST", "PUT", "PATCH")


class Deadlines:
    """One timer for every awaited send and body receive in flight, instead of one each: a
    wait records its deadline, and a check a second (or sooner, for short timeouts) cancels
    the task of any wait past it, which then raises TimeoutError. asyncio.timeout around each
    send scheduled and cancelled a timer every time: ~7% of a cache hit's event-loop time
    (py-spy under benchmarks/server_load.py). Event loop only."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.waiting: dict[asyncio.Task, float] = {}  # task -> when its wait times out
        self.late: set[asyncio.Task] = set()  # cancelled here, not by anyone else
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's (a test may run several)

    async def within(self, awaitable: Awaitable, deadline: float) -> Any:
        """`awaitable`, or TimeoutError once the loop's clock passes `deadline`."""
        task = asyncio.current_task()
        if task is None or not hasattr(task, "uncancel"):  # pragma: no cover - Python 3.10
            loop = asyncio.get_running_loop()
            return await asyncio.wait_for(awaitable, max(deadline - loop.time(), 0))
        self.waiting[task] = deadline
        if self._timer is None or self._loop is not task.get_loop():
            self._loop = task.get_loop()
            self._timer = self._loop.call_later(self.period, self._check)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if task not in self.late:
                raise  # a cancellation of someone else's (shutdown, a disconnect)
            raise asyncio.TimeoutError from None
        finally:
            self.waiting.pop(task, None)
            if task in self.late:  # ours taken back, even where the awaitable swallowed it
                self.late.discard(task)
                task.uncancel()

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            return  # a timer of a loop since replaced
        now = loop.time()
        for task, deadline in list(self.waiting.items()):
            if task.done():  # its loop is gone
                self.waiting.pop(task, None)
            elif now >= deadline and task not in self.late:
                self.late.add(task)
                task.cancel()
        self._timer = loop.call_later(self.period, self._check) if self.waiting else None


class ClientTooSlow(Exception):
    """The client stopped reading the reply: the request ends, the connection is closed."""


@dataclass(frozen=True)
class GuardOptions:
    hosts: tuple[str, ...] = LOOPBACK_NAMES  # names the server answers to; "*": any
    cors: tuple[str, ...] = ()  # origins allowed besides the server itself; "*": any
    body_timeout: float = 30.0
    api_key: str | None = None


def host_names(bound: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The Host names to answer to: loopback, the bound address (and, bound to every
    interface, this machine's name), and the user's `--allowed-hosts`."""
    import socket

    names = [*LOOPBACK_NAMES, bound.strip("[]").lower()]
    if bound in WILDCARDS:
        names += [socket.gethostname().lower(), socket.getfqdn().lower()]
    names += [h.strip().lower() for h in extra if h.strip()]
    return tuple(dict.fromkeys(n for n in names if n not in WILDCARDS))


def _hostname(netloc: str) -> str:
    """'Example.COM:8081' -> 'example.com', '[::1]:80' -> '::1'."""
    try:
        name = urlsplit(f"//{netloc}").hostname or ""
    except ValueError:
        return "\0"  # unparseable: matches nothing
    return name.rstrip(".")


def _is_safe_literal(name: str) -> bool:
    """Loopback names, and any IP address: DNS rebinding needs a *name* that the attacker's
    DNS points at us; a browser sends an IP as Host only to a page of that very IP."""
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def key_given(headers: Headers, api_key: str | None) -> bool:
    """The request carries the API key (Bearer or x-api-key), compared in constant time."""
    if not api_key:
        return True
    given = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        given = given or auth[7:].strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


class Guard:
    def __init__(self, app: ASGIApp, options: GuardOptions,
                 say: Callable[[str], None]) -> None:
        self.app = app
        self.options = options
        self.note = Throttle(say)
        self.hosts = frozenset(options.hosts)
        self.cors = frozenset(o.rstrip("/").lower() for o in options.cors)
        self.deadlines = Deadlines(period=min(1.0, options.body_timeout / 4))

    def host_ok(self, host: str | None) -> bool:
        if host is None or "*" in self.hosts:  # HTTP/1.0 clients send none; browsers do
            return True
        name = _hostname(host)
        return name in self.hosts or _is_safe_literal(name)

    def origin_ok(self, origin: str | None, host: str | None, scheme: str = "http") -> bool:
        if origin is None or "*" in self.cors:
            return True
        origin = origin.rstrip("/").lower()
        if origin in self.cors:
            return True
        # This server itself: its Host, and the scheme it speaks (a page of https:// or ws://
        # on the same host and port is another origin).
        return host is not None and origin == f"{scheme}://{host.lower()}"

    def refusal(self, scope: Scope, headers: Headers) -> ApiError | None:
        host, origin = headers.get("host"), headers.get("origin")
        if not self.host_ok(host):
            self.note("host", f"refused requests for Host {host!r}: not a name of this "
                      "server (a DNS-rebinding page?); allow it with --allowed-hosts")
            return ApiError(403, f"Host {host!r} is not allowed here; start the server "
                            "with --allowed-hosts to allow it", code="host_not_allowed")
        if not self.origin_ok(origin, host, scope.get("scheme", "http")):
            self.note("origin", f"refused browser requests from Origin {origin!r}; "
                      "allow it with --cors")
            return ApiError(403, f"cross-origin requests from {origin!r} are not allowed; "
                            "start the server with --cors to allow them",
                            code="origin_not_allowed")
        if scope["method"] in BODY_METHODS:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                self.note("type", f"refused bodies of type {kind or 'none'!r}")
                return ApiError(415, f"the body must be application/json, not "
                                f"{kind or 'untyped'}", code="unsupported_media_type")
        if scope["path"] == "/metrics" and not key_given(headers, self.options.api_key):
            return ApiError(401, "invalid or missing API key", code="invalid_api_key")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if (error := self.refusal(scope, headers)) is not None:
            await error_response(error, Request(scope))(scope, receive, _closing(send))
            return
        send = self._write_deadline(send)
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        await self.app(scope, *self._body_deadline(receive, send))

    def _write_deadline(self, send: Send) -> Send:
        """A send that gives up when the client has read nothing for `body_timeout` seconds
        (a reply it never reads would hold its connection, and its generation, forever)."""
        async def timed_send(message: Message) -> None:
            deadline = asyncio.get_running_loop().time() + self.options.body_timeout
            try:
                await self.deadlines.within(send(message), deadline)
            except asyncio.TimeoutError:
                self.note("read", f"closed connections whose client read nothing for "
                          f"{self.options.body_timeout:g} s (--request-timeout)")
                raise ClientTooSlow from None

        return timed_send

    def _body_deadline(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """receive() with the body's deadline (not after it: waiting for a disconnect is
        forever by design), and a send that closes the connection after a timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.body_timeout
        state = {"done": False, "late": False}

        async def timed_receive() -> Message:
            if state["done"]:
                return await receive()
            try:
                message = await self.deadlines.within(receive(), deadline)
            except asyncio.TimeoutError:
                state["late"] = True
                self.note("body", f"gave up on request bodies that took over "
                          f"{self.options.body_timeout:g} s (--request-timeout)")
                raise ApiError(408, "the request body did not arrive in time",
                               code="timeout") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["done"] = True
            return message

        async def send_closing_if_late(message: Message) -> None:
            await (_closing(send) if state["late"] else send)(message)

        return timed_receive, send_closing_if_late


def _closing(send: Send) -> Send:
    """A send that asks for the connection to be closed after this response."""
    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message)["connection"] = "close"
        await send(message)

    return closing
