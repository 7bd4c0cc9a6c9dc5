"""fetch: the urllib opener a download task installs for img2dataset's own download code.

img2dataset's `download_image` calls `urllib.request.urlopen(request, timeout=...)`, which uses
the opener installed in the process. `fetching(policy)` installs one built by
`build_fetch_opener` (urllib's public extension API: `build_opener` with our handlers) for the
duration of a download task, and puts urllib's default back (`install_opener(None)`) when the
last task of the process ends; tasks that overlap in one process share it, and a task with
another policy waits for them. The opener differs from urllib's default in three ways:

- `timeout` is a total deadline for one URL: it starts when the first request of a redirect
  chain is opened, is carried through redirects, and bounds the connect (and TLS handshake),
  the request and every read of the headers and body, each recv getting only what is left.
  Past it the read raises TimeoutError("timed out"). DNS resolution is bounded only by the
  system resolver. A retry (`--retries`) is a new fetch with its own deadline.
- bodies are capped at `max_bytes`: a larger Content-Length is refused before reading, and a
  body that grows past the cap is abandoned (the caller holds at most max_bytes + 1 bytes).
- a response with the W3C TDMRep header `tdm-reservation: 1` is refused when `honour_tdm` (the
  default), as img2dataset refuses X-Robots-Tag's noai: the row fails with a message naming the
  header. img2dataset's downloader reads only X-Robots-Tag (its #308), so the opener checks it.
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
import stat
import threading
import time
import urllib.error
import urllib.request
import urllib.response
from dataclasses import dataclass

DEADLINE = "dallekit_deadline"  # attribute carrying a request chain's deadline (time.monotonic())
CHUNK = 64 * 1024  # bytes read per call while counting a body against the cap
TDM_REFUSED = "Use of image disallowed by tdm-reservation: 1 header (W3C TDMRep: text and data mining rights reserved)"


@dataclass(frozen=True)
class FetchPolicy:
    """What a download task may fetch: the byte cap and where file:// URLs may point."""

    max_bytes: int
    allow_file_urls: bool = False
    file_roots: tuple[str, ...] = ()
    honour_tdm: bool = True  # refuse responses whose publisher reserves text and data mining (TDMRep)


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


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, the new request keeping the chain's deadline."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        """The stdlib's redirected request, with the deadline of the first one."""
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and hasattr(req, DEADLINE):
            setattr(new, DEADLINE, getattr(req, DEADLINE))
        return new


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
    """Starts each request chain's deadline, refuses TDM reservations and caps the final response's body."""

    handler_order = 1100  # responses after HTTPErrorProcessor (1000): only the end of a redirect chain is capped

    def __init__(self, max_bytes: int, honour_tdm: bool = True):
        self.max_bytes, self.honour_tdm = max_bytes, honour_tdm

    def http_request(self, req):
        """Set the deadline when the chain's first request is opened (redirects carry it on)."""
        if not hasattr(req, DEADLINE) and isinstance(req.timeout, (int, float)):
            setattr(req, DEADLINE, time.monotonic() + req.timeout)
        return req

    def http_response(self, req, response):
        """Refuse a Content-Length above the cap; count the body against it while it is read."""
        if isinstance(response, _CappedResponse):
            return response
        if self.honour_tdm and any(v.strip() == "1" for v in response.headers.get_all("tdm-reservation") or []):
            response.close()
            raise Refused(TDM_REFUSED)
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
    """urllib's default opener with our handlers in place of its HTTP(S), redirect, file, ftp, data and proxy ones."""
    proxies = {k: v for k, v in urllib.request.getproxies().items() if k in ("http", "https")}
    return urllib.request.build_opener(
        urllib.request.ProxyHandler(proxies), _HTTPHandler(), _HTTPSHandler(), _RedirectHandler(),
        _PolicyHandler(policy.max_bytes, policy.honour_tdm), _FileHandler(policy.allow_file_urls, policy.file_roots),
        _NoFTPHandler(), _NoDataHandler(), _NoUnknownHandler(),
    )


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
            urllib.request.install_opener(build_fetch_opener(policy))
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
