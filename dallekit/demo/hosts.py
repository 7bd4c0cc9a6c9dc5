"""Loopback test hosts: several web hosts on one machine, each with its own robots.txt and limits.

On Linux every address 127.x.x.x is this machine's loopback, so servers on 127.0.0.2 ..
127.0.0.9 are distinct hosts to a client that keys anything by host (robots.txt, per-host
politeness) while no packet leaves the machine. A `LoopbackHost` is a `ShapesServer` on such an
address that follows its `HostRules`: a robots.txt (served, missing, failing or slow), a rate
limit, a concurrency limit, a service time, or silence; and it counts what it received and what
it answered, so a test or a benchmark can check a client's manners from the server's side.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import math
import time
from dataclasses import dataclass

from dallekit.demo.synthetic import NOT_FOUND, Route, ShapesServer, _Handler

ROBOTS_PATH = "/robots.txt"


@dataclass
class HostRules:
    """How a loopback host answers: its robots.txt, its limits and its speed."""

    robots_txt: str | None = None  # body served at /robots.txt with robots_status; None: /robots.txt is a 404
    robots_status: int = 200  # e.g. 503: a robots.txt that errors
    robots_delay: float = 0.0  # seconds before /robots.txt answers (a slow one)
    rate_limit: float | None = None  # token bucket, requests per second; a request finding no token gets 429
    burst: int | None = None  # bucket capacity (default: max(1, round(rate_limit)))
    retry_after: str | None = None  # Retry-After header value sent with every 429 (e.g. "1" or an HTTP date)
    retry_after_date: bool = False  # send `retry_after` (seconds) as the HTTP date that many seconds after each 429
    max_in_flight: int | None = None  # 429 when more than this many requests are being served at once
    service_time: float = 0.0  # seconds each request that passes the limits takes to answer (so concurrency is visible)
    silent: bool = False  # listen but never accept(): connections open (up to the backlog) and nothing is ever answered


class TokenBucket:
    """A token bucket: `rate` tokens a second up to `burst`; it starts full.

    It models nginx's `limit_req zone=... rate=R burst=N nodelay`: a burst of about N requests
    passes at once, then R a second, and a request over the limit is refused at once (nginx
    lets N + 1 through at once; here exactly N).
    """

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = float(burst), time.monotonic()

    def take(self) -> bool:
        """Whether a token was there (and is now taken); a refused request takes none."""
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _HostHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        host: LoopbackHost = self.server.owner  # type: ignore[attr-defined]
        route = host.arrive(self.path.split("?", 1)[0])
        try:
            if route.delay:
                time.sleep(min(route.delay, host.max_delay))
        finally:  # out before the answer is sent: a client that has its answer may start its next request at once
            host.leave()
        self.answer(dataclasses.replace(route, delay=0.0), host.max_delay)


class LoopbackHost(ShapesServer):
    """One web host on a loopback address (127.0.0.2 .. 127.0.0.9), serving `routes` by `rules`.

    /robots.txt is answered outside the limits (no token, never a 429, no service time); every
    other path first meets `max_in_flight`, then the rate limit, and a request refused by either
    gets 429 (with `retry_after` when set) at once. The counters (`requests`, `by_path`,
    `statuses`, `peak_in_flight`) count a request when it arrives and its status before it is
    sent, so a client that has its answer finds it counted; a request is in flight from its
    arrival until its answer is about to be sent. A silent host never accepts a
    connection, so it counts nothing. Stops itself after `max_seconds` or `max_requests`.
    """

    handler = _HostHandler

    def __init__(self, address: str = "127.0.0.2", routes: dict[str, Route] | None = None, rules: HostRules | None = None,
                 port: int = 0, max_seconds: float = 600, max_requests: int = 10**6):
        self.rules = rules or HostRules()
        super().__init__(routes, port=port, max_seconds=max_seconds, max_requests=max_requests, address=address)
        rate = self.rules.rate_limit
        burst = self.rules.burst if self.rules.burst is not None else max(1, round(rate or 1))
        self._bucket = TokenBucket(rate, burst) if rate is not None else None
        self._in_flight = 0
        self.reset_counters()

    def reset_counters(self) -> None:
        """Start every counter afresh (the rate limit's bucket and the `max_requests` bound keep their state)."""
        with self._lock:
            self.requests = 0
            self.by_path: collections.Counter = collections.Counter()
            self.statuses: collections.Counter = collections.Counter()
            self.peak_in_flight = self._in_flight

    def start(self) -> LoopbackHost:
        """Start serving in a background thread; a silent host only listens."""
        if self.rules.silent:
            self._timer.start()
            return self
        super().start()
        return self

    def arrive(self, path: str) -> Route:
        """Count a request for path and decide its answer by the rules."""
        self.count_request()
        with self._lock:
            self.by_path[path] += 1
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            route = self._route(path)
            self.statuses[route.status] += 1
        return route

    def leave(self) -> None:
        """A request has been answered."""
        with self._lock:
            self._in_flight -= 1

    def _route(self, path: str) -> Route:
        """The answer to path (called under the lock, with this request already in flight)."""
        rules = self.rules
        if path == ROBOTS_PATH:
            if rules.robots_txt is None:
                return NOT_FOUND
            return Route(rules.robots_txt.encode(), rules.robots_status, {"Content-Type": "text/plain"}, delay=rules.robots_delay)
        if rules.max_in_flight is not None and self._in_flight > rules.max_in_flight:
            return self._too_many()
        if self._bucket is not None and not self._bucket.take():
            return self._too_many()
        route = self.routes.get(path, NOT_FOUND)
        return dataclasses.replace(route, delay=route.delay + rules.service_time) if rules.service_time else route

    def _too_many(self) -> Route:
        headers = {"Content-Type": "text/plain"}
        if self.rules.retry_after is not None:
            value = self.rules.retry_after
            if self.rules.retry_after_date:  # rounded up to the next whole second, as an HTTP date can only say
                value = email.utils.formatdate(math.ceil(time.time() + float(value)), usegmt=True)
            headers["Retry-After"] = value
        return Route(b"too many requests", 429, headers)

