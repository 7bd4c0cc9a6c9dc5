"""fetch: the urllib opener a download task installs for img2dataset's own download code.

img2dataset's `download_image` calls `urllib.request.urlopen(request, timeout=...)`, which uses
the opener installed in the process. `fetching(policy)` installs a `PoliteOpener` for the
duration of a download task, and puts urllib's default back (`install_opener(None)`) when the
last task of the process ends; tasks that overlap in one process share it, and a task with
another policy waits for them. img2dataset is given `retries=0` and no header directives: the
opener does both. For one URL it:

- follows redirects itself (at most 10 hops, http and https only), each hop a request of its
  own: checked against its origin's robots.txt (`optouts`, unless `--robots-txt ignore`),
  started only when its host's politeness allows (`politeness.Hosts`: connections in flight,
  rate, Retry-After), and refused when its headers opt out (X-Robots-Tag directives, TDMRep's
  `tdm-reservation: 1`), so an opt-out on any hop of a redirect counts;
- tries again after a 429, or a 503 with Retry-After (the host pauses or slows first), up to
  `URL_RATE_LIMITED_TRIES` answers, whatever `--retries` says: the server asked to come back;
- retries (`--retries`) a timeout, a failed or reset connection and other 5xx answers (a bare
  503 among them: it says nothing about pace, and one broken object should not slow a CDN), after an
  exponential backoff with jitter that must fit in what is left of the URL's `timeout`;
- reads the whole body (capped) before it frees the host's connection, and hands img2dataset
  a response over those bytes.

`timeout` is the URL's total budget of network time: every hop's connect (and TLS handshake),
request and every read of its headers and body, each recv getting only what is left, plus the
backoffs between retries. Past it a read raises TimeoutError("timed out"). An origin's robots.txt
is fetched with a whole `timeout` of its own, whatever earlier hops spent. Waiting for the
host's turn (its connections, its rate, its Retry-After) is not counted: the host's limits and
`--max-retry-after` bound it, and a host that stops answering is given up (`politeness`). DNS
resolution is bounded only by the system resolver.

Below it, `build_fetch_opener` (urllib's public extension API: `build_opener` with our
handlers) makes one request per call:

- bodies are capped at `max_bytes`: a larger Content-Length is refused before reading, and a
  body that grows past the cap is abandoned (the caller holds at most max_bytes + 1 bytes).
- only http and https are fetched (proxies from the environment are used for those alone).
  file:// is read only when `allow_file_urls`, or when the file's real path (symlinks and
  `..` resolved) lies inside one of `file_roots`, and only if it is a regular file; ftp://,
  data: and every other scheme are refused. A refusal raises `Refused`, whose message
  img2dataset records as the row's error (status failed_to_download).
"""

from __future__ import annotations

import contextlib
import email.message
import functools
import http.client
import io
import mimetypes
import os
import random
import stat
import string
import sys
import threading
import time
import urllib.error
import urllib.request
import urllib.response
from dataclasses import dataclass, field, replace
from urllib.parse import quote, urljoin, urlsplit

from dallekit.pipeline.optouts import (
    IMG2DATASET_AGENT,
    ROBOTS_DISALLOWED,
    ROBOTS_MAX_BYTES,
    ROBOTS_UNAVAILABLE,
    TDM_REFUSED,
    X_ROBOTS_REFUSED,
    RobotsCache,
    RobotsFile,
    header_opt_out,
)
from dallekit.pipeline.politeness import HOST_SILENT, RATE_LIMITED, HostLimits, Hosts, retry_after_seconds

__all__ = ["TDM_REFUSED", "FetchPolicy", "PoliteOpener", "Refused", "build_fetch_opener", "fetching", "row_outcome"]

DEADLINE = "dallekit_deadline"  # attribute carrying a request's deadline (time.monotonic())
CHUNK = 64 * 1024  # bytes read per call while counting a body against the cap
MAX_REDIRECTS = 10  # hops one URL may take (urllib's default)
ROBOTS_REDIRECTS = 5  # hops a robots.txt may take (RFC 9309: at least five)
URL_RATE_LIMITED_TRIES = 6  # 429 (or 503 with Retry-After) answers one URL may get before its row fails as rate limited
# what a failed row's message says happened, by its start: counted in download's stats, clean's reasons
OUTCOMES = (
    (ROBOTS_DISALLOWED, "robots_txt"),
    (ROBOTS_UNAVAILABLE, "robots_txt_unavailable"),
    (X_ROBOTS_REFUSED, "opted_out"),
    (TDM_REFUSED, "opted_out"),
    (RATE_LIMITED, "rate_limited"),
    (HOST_SILENT, "host_not_answering"),
)
BACKOFF_BASE, BACKOFF_CAP = 0.5, 8.0  # seconds: the first retry waits 0.25-0.5 s, each next one twice that, at most 4-8 s


@dataclass(frozen=True)
class FetchPolicy:
    """What a download task may fetch and how politely: the byte cap, file:// roots, opt-outs, host limits and retries."""

    max_bytes: int
    allow_file_urls: bool = False
    file_roots: tuple[str, ...] = ()
    honour_tdm: bool = True  # refuse responses whose publisher reserves text and data mining (TDMRep)
    robots_txt: bool = True  # honour robots.txt
    agents: tuple[str, ...] = (IMG2DATASET_AGENT,)  # names matched in robots.txt groups and X-Robots-Tag prefixes
    header_directives: frozenset[str] = field(default_factory=frozenset)  # X-Robots-Tag directives that opt an image out
    limits: HostLimits = field(default_factory=HostLimits)
    retries: int = 0  # extra tries after a timeout, a failed connection or a 5xx (429s and paced 503s are tried anyway)


def row_outcome(message: str | None) -> str | None:
    """What a failed row's error message says kept it: robots_txt, robots_txt_unavailable, opted_out, rate_limited, host_not_answering; else None."""
    return next((outcome for start, outcome in OUTCOMES if message and message.startswith(start)), None)


class Refused(urllib.error.URLError):
    """A URL or body the policy refuses; its message is the reason alone (img2dataset stores str(err))."""

    def __str__(self) -> str:
        return str(self.reason)


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "..."  # data: URLs can be megabytes long


def _remaining(deadline: float) -> float:
    """Seconds left before `deadline`; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class _DeadlineReader(io.RawIOBase):
    """A socket's raw reader that gives each recv only what is left of the deadline."""

    def __init__(self, sock, deadline: float):
        super().__init__()
        # the socket's own SocketIO, so the socket stays open until the response is closed
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket whose reads and writes share one deadline; the rest goes to the socket."""

    def __init__(self, sock, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str = "rb", *args, **kwargs):
        """The response reader http.client asks for, read under the deadline."""
        if mode != "rb":
            raise ValueError(f"unsupported socket file mode {mode!r}")
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def sendall(self, data, *flags):
        """Send the request within what is left of the deadline."""
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.sendall(data, *flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _DeadlineConnection:
    """Mixin for http.client connections: connect, request and response all fit in one deadline."""

    def __init__(self, *args, deadline: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        """Connect (and for HTTPS shake hands) within what is left, then read and write under the deadline."""
        if self._deadline is None:
            return super().connect()
        self.timeout = _remaining(self._deadline)
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    """HTTPConnection under a total deadline."""


class DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    """HTTPSConnection under a total deadline."""


_DEADLINE_CLASSES = {http.client.HTTPConnection: DeadlineHTTPConnection, http.client.HTTPSConnection: DeadlineHTTPSConnection}


class _DeadlineOpen:
    """Mixin for urllib's HTTP(S) handlers: open the connection with the request chain's deadline."""

    def do_open(self, http_class, req, **http_conn_args):
        """urllib's do_open with our connection class for `http_class`."""
        deadline = getattr(req, DEADLINE, None)
        if deadline is not None and http_class in _DEADLINE_CLASSES:
            http_class = functools.partial(_DEADLINE_CLASSES[http_class], deadline=deadline)
        return super().do_open(http_class, req, **http_conn_args)


class _HTTPHandler(_DeadlineOpen, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineOpen, urllib.request.HTTPSHandler):
    pass


class _NoRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed here: a 3xx raises HTTPError, and `PoliteOpener` follows it as a request of its own."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        """No new request: the 3xx answer goes back to the caller."""
        return None


class _CappedResponse:
    """A response whose body may not exceed `max_bytes`; everything else goes to the response."""

    def __init__(self, response, max_bytes: int):
        self._response, self._max, self._left = response, max_bytes, max_bytes

    def read(self, amt: int | None = None) -> bytes:
        """Read like the response does, refusing the body once it passes the cap."""
        limited = amt is not None and amt >= 0
        parts = []
        while True:
            data = self._response.read(min(amt, self._left + 1) if limited else min(CHUNK, self._left + 1))
            self._left -= len(data)
            if self._left < 0:
                self._response.close()
                raise Refused(f"body larger than max_image_bytes ({self._max} bytes)")
            parts.append(data)
            if limited or not data:
                return b"".join(parts)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._response.close()

    def __getattr__(self, name):
        return getattr(self._response, name)


class _PolicyHandler(urllib.request.BaseHandler):
    """Starts each request's deadline and caps the body of a response that is not an error or a redirect."""

    handler_order = 1100  # responses after HTTPErrorProcessor (1000): errors and redirects raise before

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def http_request(self, req):
        """Set the deadline when the chain's first request is opened (redirects carry it on)."""
        if not hasattr(req, DEADLINE) and isinstance(req.timeout, (int, float)):
            setattr(req, DEADLINE, time.monotonic() + req.timeout)
        return req

    def http_response(self, req, response):
        """Refuse a Content-Length above the cap; count the body against it while it is read."""
        if isinstance(response, _CappedResponse):
            return response
        length = (response.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise Refused(f"Content-Length {length} larger than max_image_bytes ({self.max_bytes} bytes)")
        return _CappedResponse(response, self.max_bytes)

    https_request = http_request
    https_response = file_response = http_response


class _FileHandler(urllib.request.FileHandler):
    """file:// URLs of regular local files, only where the policy allows them."""

    def __init__(self, allow_any: bool, roots: tuple[str, ...]):
        self.allow_any = allow_any
        self.roots = tuple(os.path.realpath(r) for r in roots)

    def allowed_path(self, req) -> str:
        """The real path a file:// URL names, or Refused when it lies outside what the policy allows."""
        if req.host and req.host != "localhost":
            raise Refused(f"file:// URL not allowed: {_short(req.full_url)} (not on this machine)")
        real = os.path.realpath(urllib.request.url2pathname(req.selector))  # after unquoting: %2F.. can not escape
        if not (self.allow_any or any(os.path.commonpath([real, root]) == root for root in self.roots)):
            raise Refused(f"file:// URL not allowed: {_short(req.full_url)} (outside the ingested folders; pass --allow-file-urls)")
        return real

    def file_open(self, req):
        """Open the real path (non-blocking, so a FIFO can not hang the thread) if it is a regular file."""
        path = self.allowed_path(req)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as err:
            raise urllib.error.URLError(err) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise Refused(f"file:// URL is not a regular file: {_short(req.full_url)}")
        headers = email.message.Message()
        headers["Content-type"] = mimetypes.guess_type(path)[0] or "application/octet-stream"
        headers["Content-length"] = str(info.st_size)
        return urllib.response.addinfourl(open(fd, "rb"), headers, req.full_url)


def _refuse_scheme(self, req):
    raise Refused(f"URL scheme not allowed: {req.type}: in {_short(req.full_url)} (only http and https are fetched)")


class _NoFTPHandler(urllib.request.FTPHandler):
    ftp_open = _refuse_scheme


class _NoDataHandler(urllib.request.DataHandler):
    data_open = _refuse_scheme


class _NoUnknownHandler(urllib.request.UnknownHandler):
    unknown_open = _refuse_scheme


def build_fetch_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """urllib's default opener with our handlers in place of its HTTP(S), redirect, file, ftp, data and proxy ones; one request per call."""
    proxies = {k: v for k, v in urllib.request.getproxies().items() if k in ("http", "https")}
    return urllib.request.build_opener(
        urllib.request.ProxyHandler(proxies), _HTTPHandler(), _HTTPSHandler(), _NoRedirectHandler(),
        _PolicyHandler(policy.max_bytes), _FileHandler(policy.allow_file_urls, policy.file_roots),
        _NoFTPHandler(), _NoDataHandler(), _NoUnknownHandler(),
    )


ROBOTS = RobotsCache()  # this worker process's robots.txt files, shared by its tasks
HOSTS = Hosts()  # this worker process's per-host politeness, shared by its tasks


@dataclass
class _Answer:
    """One HTTP answer: its status, reason, headers and (for a 2xx) body."""

    status: int
    reason: str
    headers: email.message.Message
    body: bytes = b""

    @property
    def retry_after(self) -> float | None:
        """Seconds its Retry-After header asks to wait, or None."""
        return retry_after_seconds(self.headers.get("Retry-After"))

    @property
    def limited(self) -> bool:
        """A 429, or a 503 that says when to come back: the host asks for fewer requests (a bare 503 is a server error)."""
        return self.status == 429 or (self.status == 503 and self.retry_after is not None)

    def error(self, url: str) -> urllib.error.HTTPError:
        """The HTTPError urllib raises for this answer (img2dataset stores its text: "HTTP Error 404: Not Found")."""
        return urllib.error.HTTPError(url, self.status, self.reason, self.headers, None)


def _timed_out(err: BaseException) -> bool:
    return isinstance(err, TimeoutError) or (isinstance(err, urllib.error.URLError) and isinstance(err.reason, TimeoutError))


def _transient(err: BaseException) -> bool:
    """Whether a failed try may pass on another: a timeout, a failed or reset connection, a 5xx; never a refusal or a 4xx."""
    if isinstance(err, Refused):
        return False
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500
    if isinstance(err, urllib.error.URLError):
        return isinstance(err.reason, OSError)
    return isinstance(err, (OSError, http.client.HTTPException))


def redirect_target(url: str, location: str) -> str:
    """Where a Location header sends `url`, percent-encoded as urllib's redirect handler does (spaces, UTF-8 read as Latin-1)."""
    # http.client decodes headers as Latin-1: encoding back recovers the server's bytes, then quote() escapes them
    return urljoin(url, quote(location.strip(), encoding="iso-8859-1", safe=string.punctuation))


def host_key(url: str) -> str:
    """What politeness counts as one host: the URL's host name and port."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    except ValueError:  # a port that is not a number: the request fails on its own
        port = 0
    return f"{(parts.hostname or '').lower()}:{port}"


def backoff_seconds(attempt: int) -> float:
    """The wait before retry number `attempt` (1, 2, ...): exponential, with jitter over its upper half."""
    top = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return random.uniform(top / 2, top)


class _Budget:
    """Seconds of network time one URL has left (its `timeout`)."""

    def __init__(self, seconds: float):
        self.total = self.left = seconds

    def deadline(self) -> float:
        """The deadline of the next request: now plus what is left; TimeoutError when nothing is."""
        if self.left <= 0:
            raise TimeoutError("timed out")
        return time.monotonic() + self.left


class PoliteOpener:
    """The opener a download task installs: robots.txt, per-host limits, opt-out headers on every hop, backoff (module docstring)."""

    def __init__(self, policy: FetchPolicy, robots: RobotsCache | None = None, hosts: Hosts | None = None):
        self.policy, self.inner = policy, build_fetch_opener(policy)
        # robots.txt is read up to ROBOTS_MAX_BYTES whatever its Content-Length: --max-image-bytes is for images
        self.robots_inner = build_fetch_opener(replace(policy, max_bytes=sys.maxsize))
        self.robots, self.hosts = robots or ROBOTS, hosts or HOSTS

    def open(self, fullurl, data=None, timeout: float = 10.0):
        """Fetch one URL (urlopen's signature); returns a response over its whole body."""
        request = fullurl if isinstance(fullurl, urllib.request.Request) else urllib.request.Request(fullurl, data)
        if request.type not in ("http", "https"):
            return self.inner.open(request, timeout=timeout)
        budget = _Budget(float(timeout) if isinstance(timeout, (int, float)) else 10.0)
        attempt = 0
        while True:
            try:
                return self._fetch(request, budget)
            except Exception as err:
                attempt += 1
                pause = backoff_seconds(attempt)
                if attempt > self.policy.retries or not _transient(err) or pause >= budget.left:
                    raise
            time.sleep(pause)
            budget.left -= pause

    def _fetch(self, request: urllib.request.Request, budget: _Budget):
        """One try at a URL: its hops, each checked and paced; 429/503 answers are tried again after the host's pause."""
        url, hops, limited, headers = request.full_url, 0, 0, dict(request.header_items())
        while True:
            # robots.txt gets the URL's whole timeout: what a slow earlier hop left says nothing about this origin,
            # and a failure is cached for the origin's every row
            self._check_robots(url, headers, budget.total)
            answer = self._exchange(url, headers, budget, again=limited > 0)
            if answer.limited:
                limited += 1
                if limited >= URL_RATE_LIMITED_TRIES:
                    raise Refused(f"{RATE_LIMITED}: HTTP Error {answer.status}: {answer.reason} from {urlsplit(url).hostname}, "
                                  f"{limited} times for this URL")
                continue
            location = answer.headers.get("Location") if 300 <= answer.status < 400 else None
            if location is None:
                break
            url, hops = redirect_target(url, location), hops + 1
            if urlsplit(url).scheme not in ("http", "https"):
                raise Refused(f"redirect to a URL scheme not allowed: {_short(url)} (only http and https are fetched)")
            if hops > MAX_REDIRECTS:
                raise Refused(f"more than {MAX_REDIRECTS} redirects from {_short(request.full_url)}")
        if not 200 <= answer.status < 300:
            raise answer.error(url)
        return urllib.response.addinfourl(io.BytesIO(answer.body), answer.headers, url, answer.status)

    def _check_robots(self, url: str, headers: dict, timeout: float) -> None:
        if self.policy.robots_txt:
            load = functools.partial(self._load_robots, headers=headers, timeout=timeout)
            refusal = self.robots.get(url, load).refusal(url, self.policy.agents)
            if refusal:
                raise Refused(refusal)

    def _load_robots(self, robots_url: str, headers: dict, timeout: float) -> RobotsFile:
        """Fetch an origin's robots.txt as a request to its host, following up to ROBOTS_REDIRECTS hops; never raises."""
        url, budget = robots_url, _Budget(timeout)
        for _ in range(ROBOTS_REDIRECTS + 1):
            try:
                answer = self._exchange(url, headers, budget, opt_outs=False, limit=ROBOTS_MAX_BYTES)
            except Exception as err:  # unreachable, timed out, refused: the origin's rows wait
                return RobotsFile.from_answer(robots_url, None, error=str(err) or type(err).__name__)
            location = answer.headers.get("Location") if 300 <= answer.status < 400 else None
            if location is None:
                return RobotsFile.from_answer(robots_url, answer.status, answer.body)
            url = redirect_target(url, location)
            if urlsplit(url).scheme not in ("http", "https"):  # never a local file (--allow-file-urls) read as robots.txt
                return RobotsFile.from_answer(robots_url, None, error=f"redirect to a URL scheme not allowed: {_short(url)}")
        return RobotsFile.from_answer(robots_url, None, error=f"more than {ROBOTS_REDIRECTS} redirects")

    def _exchange(self, url: str, headers: dict, budget: _Budget, again: bool = False, opt_outs: bool = True,
                  limit: int | None = None) -> _Answer:
        """One request to `url`'s host once it is its turn; the host learns how it went. Raises on no answer or an opt-out."""
        host, limits = host_key(url), self.policy.limits
        if budget.left <= 0:  # spent on earlier hops: no request, and this host is not counted as silent for it
            raise TimeoutError("timed out")
        started = self.hosts.acquire(host, limits, again)
        outcome, retry_after = "error", None
        try:
            answer = self._request(url, headers, budget, opt_outs, limit)
            outcome, retry_after = ("limited", answer.retry_after) if answer.limited else ("ok", None)
            return answer
        except Refused:
            outcome = "ok"  # the host answered; we refused what it said
            raise
        except Exception as err:
            outcome = "silent" if _timed_out(err) else "error"
            raise
        finally:
            self.hosts.release(host, started, limits, outcome, retry_after)

    def _request(self, url: str, headers: dict, budget: _Budget, opt_outs: bool, limit: int | None) -> _Answer:
        """Send one request within the budget; refuse an opt-out before its body is read."""
        hop = urllib.request.Request(url, headers=headers)
        started = time.monotonic()
        setattr(hop, DEADLINE, budget.deadline())
        try:
            opener = self.inner if limit is None else self.robots_inner
            with opener.open(hop, timeout=budget.left) as response:
                self._refuse_opt_out(response.headers, opt_outs)
                body = response.read(limit) if limit else response.read()
                return _Answer(response.status, response.reason, response.headers, body)
        except urllib.error.HTTPError as err:  # errors and redirects: an answer, its headers read, its body not
            with contextlib.closing(err):
                self._refuse_opt_out(err.headers, opt_outs and 300 <= err.code < 400)
                return _Answer(err.code, str(err.reason), err.headers)
        finally:
            budget.left -= time.monotonic() - started

    def _refuse_opt_out(self, headers, check: bool) -> None:
        refusal = check and header_opt_out(headers, self.policy.agents, self.policy.header_directives, self.policy.honour_tdm)
        if refusal:
            raise Refused(refusal)


class _Installed:
    """The opener installed in this process: its policy and how many tasks use it."""

    changed = threading.Condition()
    policy: FetchPolicy | None = None
    users = 0


@contextlib.contextmanager
def fetching(policy: FetchPolicy):
    """Install the policy's opener in this process for the block; urllib's default is back after the last block ends."""
    with _Installed.changed:
        while _Installed.users and _Installed.policy != policy:
            _Installed.changed.wait()
        if not _Installed.users:
            urllib.request.install_opener(PoliteOpener(policy))
            _Installed.policy = policy
        _Installed.users += 1
    try:
        yield
    finally:
        with _Installed.changed:
            _Installed.users -= 1
            if not _Installed.users:
                urllib.request.install_opener(None)
                _Installed.policy = None
                _Installed.changed.notify_all()
