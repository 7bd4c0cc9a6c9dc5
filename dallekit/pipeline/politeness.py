"""politeness: how hard one worker process presses on each host it downloads from.

`Hosts.acquire(host, limits)` returns when a request to `host` may start, and the caller
reports how it went with `Hosts.release`. Per host (the URL's host name and port, `fetch.host_key`):

- at most `limits.connections` requests are in flight;
- with `limits.rate`, starts are at least 1/rate seconds apart;
- a 429 (or a 503 with Retry-After) halves the host's rate, taken as the requests it answered
  in the last second (once per round of requests: only a request started after the last cut
  can cut it again), down to `RATE_FLOOR`; its Retry-After (seconds or an HTTP date, capped at
  `limits.max_retry_after`) also pauses the host's next start until then. The cut after a
  pause matters when several workers share a host: resuming at full speed, the first to
  resume would take the host's whole allowance each time and starve the others. Each answered
  request then raises a cut rate by a quarter, until it is back above the configured rate (or,
  with none, `RATE_CEILING`), when the limit is lifted;
- waiting requests start in order of arrival, a rate-limited request that comes back for
  another try first;
- a host that leaves `SILENT_LIMIT` requests in a row unanswered (timed out), or answers
  `RATE_LIMITED_LIMIT` in a row with 429 (or 503 with Retry-After), is given up for `GIVE_UP_SECONDS`: its waiting
  and later requests fail at once with a message that says why (`HostGivenUp`), and
  `download --retry-failed` fetches them later. So a host that accepts connections and never
  answers costs a task about SILENT_LIMIT / connections x timeout, not rows / connections x timeout.

The state is per process, shared by the threads (and overlapping tasks) of a worker. Across
Dask workers nothing is shared: each worker process keeps its own limits. At most `size` hosts
are remembered, the least recently used idle ones forgotten first.
"""

from __future__ import annotations

import collections
import datetime
import email.utils
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

RATE_FLOOR = 0.5  # requests a second a host's rate never halves below
RATE_CEILING = 1000.0  # a learned rate above this (with no --per-host-rate) is lifted: the connections bound alone
RECOVERY = 1 / 4  # an answered request raises a cut rate by this fraction
SILENT_LIMIT = 8  # unanswered (timed-out) requests in a row before a host is given up
RATE_LIMITED_LIMIT = 32  # 429 answers (or 503 with Retry-After) in a row before a host is given up
GIVE_UP_SECONDS = 600.0  # how long a given-up host's requests fail at once
RATE_LIMITED = "Rate limited"  # the message of a row whose host kept answering 429/503
HOST_SILENT = "Host not answering"  # the message of a row whose host was given up for not answering


@dataclass(frozen=True)
class HostLimits:
    """How hard a worker process may press on one host."""

    connections: int = 4  # requests in flight to one host at most
    rate: float | None = None  # requests a second to one host at most (None: as many as the connections allow)
    max_retry_after: float = 60.0  # longest Retry-After honoured, in seconds


class HostGivenUp(Exception):
    """A request to a host this process has given up for now; the message says why."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header value asks to wait (delay-seconds or an HTTP date), or None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # str.isdigit alone takes '²' (a Latin-1 header byte), which float() refuses
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with no zone named, not this machine's local time
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class _Host:
    """One host's state; guarded by its condition."""

    changed: threading.Condition = field(default_factory=threading.Condition)
    queue: list = field(default_factory=list)  # heap of (priority, ticket) of the requests waiting to start
    in_flight: int = 0
    next_start: float = 0.0  # time.monotonic() before which no request starts (the rate's spacing)
    paused_until: float = 0.0  # Retry-After
    rate: float | None = None  # the learned limit after a 429/503 without Retry-After (None: none)
    last_cut: float = 0.0  # when the rate was last halved
    answered: collections.deque = field(default_factory=collections.deque)  # start times of the last second's answered requests
    silent_in_row: int = 0
    limited_in_row: int = 0
    given_up_until: float = 0.0
    given_up_why: str = ""


class Hosts:
    """Per-host connection, rate and back-off state of this process (see the module docstring)."""

    def __init__(self, size: int = 10000):
        self.size = size
        self._hosts: collections.OrderedDict[str, _Host] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._tickets = itertools.count()

    def _host(self, name: str) -> _Host:
        with self._lock:
            host = self._hosts.get(name)
            if host is None:
                host = self._hosts[name] = _Host()
                self._forget_idle()
            self._hosts.move_to_end(name)
            return host

    def _forget_idle(self) -> None:
        """Forget the least recently used hosts nobody waits on, beyond `size`."""
        excess = len(self._hosts) - self.size
        if excess > 0:  # the oldest first; a busy one is kept, so look a little further than the excess
            for name in list(itertools.islice(self._hosts, excess + 16)):
                host = self._hosts[name]
                if excess > 0 and not host.in_flight and not host.queue:
                    del self._hosts[name]
                    excess -= 1

    def acquire(self, name: str, limits: HostLimits, again: bool = False) -> float:
        """Wait until a request to host `name` may start; returns its start time. `again`: a rate-limited request's next try."""
        host = self._host(name)
        ticket = (0 if again else 1, next(self._tickets))
        with host.changed:
            heapq.heappush(host.queue, ticket)
            try:
                now = self._wait_turn(host, ticket, limits)
            finally:
                host.queue.remove(ticket)
                heapq.heapify(host.queue)
                host.changed.notify_all()
            host.in_flight += 1
            rate = min(r for r in (host.rate, limits.rate, float("inf")) if r is not None)
            host.next_start = now + (1 / rate if rate != float("inf") else 0.0)
            return now

    @staticmethod
    def _wait_turn(host: _Host, ticket: tuple, limits: HostLimits) -> float:
        """Block (holding the host's condition) until `ticket` is first in line and the host's limits let it start."""
        while True:
            now = time.monotonic()
            if now < host.given_up_until:
                raise HostGivenUp(host.given_up_why)
            ready_at = max(host.next_start, host.paused_until)
            first = host.queue[0] == ticket
            if first and host.in_flight < limits.connections and now >= ready_at:
                return now
            host.changed.wait(ready_at - now if first and now < ready_at else None)

    def release(self, name: str, started: float, limits: HostLimits, answer: str, retry_after: float | None = None) -> None:
        """Report how a request that started at `started` ended: answer is "ok", "limited" (429/503), "silent" (timed out) or "error"."""
        host = self._host(name)
        with host.changed:
            host.in_flight -= 1
            now = time.monotonic()
            if answer == "ok":
                host.silent_in_row = host.limited_in_row = 0
                host.answered.append(started)
                while host.answered and host.answered[0] < now - 1.0:  # a second's worth at most
                    host.answered.popleft()
                self._recover(host, limits)
            elif answer == "limited":
                host.silent_in_row, host.limited_in_row = 0, host.limited_in_row + 1
                if retry_after:  # a Retry-After of 0 or a past date says nothing: treated as absent
                    host.paused_until = max(host.paused_until, now + min(retry_after, limits.max_retry_after))
                if started >= host.last_cut:  # after a pause too: resuming at full speed would drain the host's allowance at once
                    host.rate, host.last_cut = max(RATE_FLOOR, self._accepted_rate(host, limits, now) / 2), now
                    host.next_start = max(host.next_start, now + 1 / host.rate)  # the next start keeps the new pace, not the old one
                if host.limited_in_row >= RATE_LIMITED_LIMIT:
                    self._give_up(host, now, f"{RATE_LIMITED}: {name} answered {host.limited_in_row} requests in a row with 429/503")
            elif answer == "silent":
                host.silent_in_row += 1
                if host.silent_in_row >= SILENT_LIMIT:
                    self._give_up(host, now, f"{HOST_SILENT}: {name} left {host.silent_in_row} requests in a row unanswered")
            host.changed.notify_all()

    @staticmethod
    def _accepted_rate(host: _Host, limits: HostLimits, now: float) -> float:
        """Requests a second the host answered lately (those started in the last second), within the limits in force."""
        while host.answered and host.answered[0] < now - 1.0:
            host.answered.popleft()
        limit = min((r for r in (host.rate, limits.rate) if r is not None), default=float("inf"))
        return min(limit, float(len(host.answered))) if host.answered else min(limit, 2 * RATE_FLOOR)

    @staticmethod
    def _recover(host: _Host, limits: HostLimits) -> None:
        if host.rate is None:
            return
        host.rate *= 1 + RECOVERY
        if host.rate > (limits.rate or RATE_CEILING):
            host.rate = None

    @staticmethod
    def _give_up(host: _Host, now: float, why: str) -> None:
        host.given_up_until = now + GIVE_UP_SECONDS
        host.given_up_why = f"{why}; its rows are not fetched for now (`dallekit download --retry-failed` fetches them later)"
        host.silent_in_row = host.limited_in_row = 0
