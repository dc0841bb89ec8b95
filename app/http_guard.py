"""The studio's front door: ASGI middleware in front of everything it serves (the page, /config, /gradio_api/*,
uploads, files, server-sent events and websockets).

- HostGuard answers only requests that name the studio by an address it was started on (the Host header), and
  browser requests whose Origin is the studio's own page. A web page elsewhere can make a browser send requests to
  127.0.0.1 by re-pointing its own DNS name there (DNS rebinding); those requests carry the foreign name in Host
  (and Origin), so they are refused before Gradio sees them.
- LoginThrottle slows password guessing: after a few failed logins from one client address, that address must wait
  (twice as long after each further failure) before the next attempt is even checked. Every failure is logged with
  the address, never with what was typed.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

log = logging.getLogger("studio.http")

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})


def normalise_host(host: str) -> str:
    """'Example.COM.' -> 'example.com', '[::1]' -> '::1': the form allowed hosts are compared in."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") else host


def host_of(header: str) -> str:
    """The host part of a Host header value ('localhost:7860', '[::1]:7860', 'example.com')."""
    header = header.strip()
    if header.startswith("["):
        return normalise_host(header[: header.find("]") + 1])
    name, sep, port = header.rpartition(":")
    return normalise_host(name if sep and port.isdigit() and ":" not in name else header)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    host = normalise_host(host)
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:  # a host name: loopback only if every address it resolves to is
            addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


class HostPolicy:
    """Which names a request may use for the studio.

    A loopback bind answers to 127.0.0.1, localhost, [::1] and the bound address. Another address answers to that
    address. A wildcard bind (0.0.0.0, ::) answers to the loopback names, this machine's host names and any IP
    address (a browser only sends an IP address as Host when it connected to that address, so an IP address cannot
    be used for DNS rebinding). Names the operator lists (--allowed-host) are added in every case."""

    def __init__(self, bind_host: str, extra: list[str] | tuple[str, ...] = ()):
        bind = normalise_host(bind_host)
        self.extra = frozenset(normalise_host(h) for h in extra if h.strip())
        names = {bind} | self.extra
        self.any_ip = bind in WILDCARD_BINDS
        if self.any_ip:
            names |= LOOPBACK_NAMES | {normalise_host(socket.gethostname()), normalise_host(socket.getfqdn())}
        elif is_loopback(bind):
            names |= LOOPBACK_NAMES
        self.names = frozenset(n for n in names if n and n not in WILDCARD_BINDS)

    def allows(self, host: str) -> bool:
        return host in self.names or (self.any_ip and is_ip(host))

    def refusal(self, host_header: str | None, origin: str | None) -> str | None:
        """Why a request is refused (None: it is not)."""
        if not host_header:
            return "the request has no Host header"
        host = host_of(host_header)
        if not self.allows(host):
            return (f"this studio does not answer to the host name {host[:80]!r} (start it with --allowed-host "
                    f"{host[:80]} if that name is yours)")
        if origin is None:
            return None
        parts = urlsplit(origin.strip())
        same_origin = parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.strip().lower()
        listed = parts.scheme in ("http", "https") and normalise_host(parts.hostname or "") in self.extra
        if not (same_origin or listed):
            return f"requests from pages of other sites ({origin[:80]!r}) are refused"
        return None


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _plain(send, status: int, text: str, extra_headers: tuple = ()) -> None:
    body = (text + "\n").encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"x-content-type-options", b"nosniff"),
                            (b"content-length", str(len(body)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


# Another site may not show the studio inside a frame of its own page, where a click could be stolen (clickjacking).
FRAME_HEADERS = ((b"x-frame-options", b"SAMEORIGIN"), (b"content-security-policy", b"frame-ancestors 'self'"))


class HostGuard:
    """Refuses (403, plain text) any HTTP request or websocket whose Host or Origin the policy does not allow;
    adds the no-framing headers to every answer."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        why = self.policy.refusal(_header(scope, b"host"), _header(scope, b"origin"))
        if why is None:
            return await self.app(scope, receive, self.framing_headers(send) if scope["type"] == "http" else send)
        client = (scope.get("client") or ("?",))[0]
        log.warning("refused %s %s from %s: %s", scope["type"], scope.get("path", "")[:200], client, why)
        if scope["type"] == "websocket":  # closing before accepting makes the server answer 403
            return await send({"type": "websocket.close", "code": 1008})
        await _plain(send, 403, f"403 Forbidden: {why}.")

    @staticmethod
    def framing_headers(send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers") or ()}
                extra = [h for h in FRAME_HEADERS if h[0] not in names]
                message = {**message, "headers": [*(message.get("headers") or ()), *extra]}
            await send(message)

        return send_with_headers


class LoginThrottle:
    """Failed logins per client address: the FREE_FAILURES-th failure in a row locks the address out for
    FIRST_LOCK_S seconds, each further one for twice as long as the last, up to MAX_LOCK_S. A success clears the
    count. The counts live in memory: a restart clears them."""

    FREE_FAILURES = 5
    FIRST_LOCK_S = 30
    MAX_LOCK_S = 3600
    MAX_CLIENTS = 10_000

    def __init__(self, app):
        self.app = app
        self.failures: dict[str, tuple[int, float]] = {}  # address -> (failures in a row, locked until)

    @staticmethod
    def is_login(scope) -> bool:
        return scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").rstrip("/").endswith("/login")

    async def __call__(self, scope, receive, send):
        if not self.is_login(scope):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        wait = self.failures.get(client, (0, 0.0))[1] - time.monotonic()
        if wait > 0:
            log.warning("login from %s refused: locked out for another %d s after repeated failures", client,
                        math.ceil(wait))
            return await _plain(send, 429, f"Too many failed logins from this address: try again in "
                                           f"{math.ceil(wait)} s.", ((b"retry-after", str(math.ceil(wait)).encode()),))
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") == 200:
            self.failures.pop(client, None)
        elif status.get("code") in (400, 401, 403):
            self.record_failure(client)

    def record_failure(self, client: str) -> None:
        count = self.failures.get(client, (0, 0.0))[0] + 1
        over = count - self.FREE_FAILURES
        lock = min(self.FIRST_LOCK_S * 2 ** over, self.MAX_LOCK_S) if over >= 0 else 0
        if len(self.failures) >= self.MAX_CLIENTS:
            now = time.monotonic()
            self.failures = {k: v for k, v in self.failures.items() if v[1] > now}
        self.failures[client] = (count, time.monotonic() + lock)
        log.warning("failed login from %s (%d in a row)%s", client, count,
                    f"; further attempts from it refused for {lock} s" if lock else "")


def guard_lifespan(policy: HostPolicy):
    """A FastAPI lifespan that puts the login throttle and the host guard outside the whole middleware stack of the
    app Gradio builds (its own CORS layer included), before the server accepts its first connection. The stack is
    built by then: the lifespan event itself went through it."""

    @asynccontextmanager
    async def lifespan(app):
        inner = app.middleware_stack or app.build_middleware_stack()
        app.middleware_stack = HostGuard(LoginThrottle(inner), policy)
        yield

    return lifespan


def is_guarded(app) -> bool:
    return isinstance(getattr(app, "middleware_stack", None), HostGuard)
