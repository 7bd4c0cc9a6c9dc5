"""optouts: what a site says about its images being downloaded, read per each signal's own spec.

The one module that reads opt-outs; `fetch.PoliteOpener` asks it about every URL and every hop.

- robots.txt (RFC 9309), parsed by Scrapy's `protego`. The group for our user agent applies, else
  `*`; within it the longest matching path wins, `Allow` on a tie, with `*` and `$` wildcards.
  We answer to two names: the `--user-agent-token`, when one is set, and `img2dataset`, whose
  downloader fetches the images and which sites name when they opt out of it. The groups that
  name one of us apply, and a URL is fetched only when each of them allows it; `*` applies
  when no group names us. A robots.txt that answers 4xx means no rules; a 5xx,
  a 429 or no answer at all means the origin's rows are not fetched this time (as Google does),
  with their own message so that `download --retry-failed` takes them up later. Files are cached
  per origin (scheme, host, port) for a day, a failure for five minutes; the first 500 KiB are
  read (Google's limit).
- X-Robots-Tag (Google's rules): a comma list of directives; a `botname:` prefix makes the
  directives after it, up to the next prefix, that bot's only; several headers add up; `none` is
  `noindex, nofollow`; `unavailable_after: <date>` carries its own colon (and, in RFC 850 dates, a
  comma) and means `noindex` once the date has passed; `max-image-preview: none` is a value, not
  the `none` directive. img2dataset's own parser takes whatever precedes the first colon as a bot
  name, so it let `noai, unavailable_after: ...` and `max-image-preview: none, noai` through.
- TDMRep: `tdm-reservation: 1` reserves text-and-data-mining rights. A repeated or folded header
  (`1, 1`, `0, 1`) is reserved when any of its values is 1; a value other than 0 or 1 is ignored.
"""

from __future__ import annotations

import collections
import datetime
import email.utils
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from protego import Protego

IMG2DATASET_AGENT = "img2dataset"  # the downloader's name, in its User-Agent and in sites' robots.txt groups
X_ROBOTS_REFUSED = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's message, then the directives
TDM_REFUSED = "Use of image disallowed by tdm-reservation: 1 header (W3C TDMRep: text and data mining rights reserved)"
ROBOTS_DISALLOWED = "Disallowed by robots.txt"
ROBOTS_UNAVAILABLE = "robots.txt unavailable"
ROBOTS_MAX_BYTES = 500 * 1024  # Google reads the first 500 KiB of a robots.txt and ignores the rest
ROBOTS_CACHE_BYTES = 16 * 2**20  # robots.txt text a process keeps parsed at most: protego holds ~40x the text (500 KiB: ~20 MB)
ROBOTS_TTL = 24 * 3600.0  # seconds a fetched robots.txt is used (Google: up to a day)
ROBOTS_ERROR_TTL = 300.0  # seconds an unreadable robots.txt keeps its origin's rows waiting before it is asked again
VALUE_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_WEEKDAY = re.compile(r"(mon|tues|wednes|thurs|fri|satur|sun)(day)?$|(mon|tue|wed|thu|fri|sat|sun)$", re.I)


def agent_names(token: str | None) -> tuple[str, ...]:
    """The names robots.txt groups and X-Robots-Tag prefixes are matched against: the token (when set) and img2dataset."""
    names = [token.strip().lower()] if token and token.strip() else []
    return tuple(dict.fromkeys(names + [IMG2DATASET_AGENT]))


def _parse_date(text: str) -> datetime.datetime | None:
    """An `unavailable_after` date in RFC 822, RFC 850 or ISO 8601 form (UTC when it names no zone), or None."""
    text = text.strip()
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        try:
            parsed = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _items(value: str) -> list[str]:
    """A header value's comma-separated items, an RFC 850 date's weekday joined back to the rest of its date."""
    items: list[str] = []
    for part in value.split(","):
        if items and items[-1].lower().startswith("unavailable_after") and _WEEKDAY.match(items[-1].partition(":")[2].strip()):
            items[-1] += "," + part
        else:
            items.append(part)
    return [item.strip() for item in items if item.strip()]


def x_robots_directives(values: Iterable[str], agents: tuple[str, ...], now: datetime.datetime | None = None) -> set[str]:
    """The X-Robots-Tag directives (lowercase) that apply to one of `agents` or to every bot, `none` and past `unavailable_after` expanded."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    applied: set[str] = set()
    for value in values:
        bot = None  # directives before any `botname:` prefix apply to every bot
        for item in _items(value):
            name, colon, rest = item.partition(":")
            if colon and name.strip().lower() not in VALUE_DIRECTIVES:
                bot, item = name.strip().lower(), rest.strip()
                name, colon, rest = item.partition(":")
            directive = name.strip().lower()
            if not directive or (bot is not None and bot not in agents):
                continue
            applied.add(directive)
            if directive == "none":
                applied |= {"noindex", "nofollow"}
            elif directive == "unavailable_after" and (date := _parse_date(rest)) is not None and date <= now:
                applied.add("noindex")
    return applied


def tdm_reserved(values: Iterable[str]) -> bool:
    """Whether `tdm-reservation` header values reserve text-and-data-mining rights: any of their values is 1."""
    return any(item.strip() == "1" for value in values for item in value.split(","))


def header_opt_out(headers, agents: tuple[str, ...], disallowed: frozenset[str], honour_tdm: bool) -> str | None:
    """Why a response's headers opt its image out (X-Robots-Tag, TDMRep), or None; `headers` is an email.message.Message."""
    if disallowed:
        hit = x_robots_directives(headers.get_all("X-Robots-Tag") or [], agents) & disallowed
        if hit:
            return f"{X_ROBOTS_REFUSED}: {', '.join(sorted(hit))}"
    if honour_tdm and tdm_reserved(headers.get_all("tdm-reservation") or []):
        policy = (headers.get("tdm-policy") or "").strip()
        return TDM_REFUSED + (f"; policy {policy[:200]}" if policy else "")
    return None


def robots_url(url: str) -> str:
    """The robots.txt URL of a URL's origin (scheme, host and port), the host in lowercase and a default port left out."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2].lower()  # host names are case-insensitive: one file per origin
    default_port = {"http": ":80", "https": ":443"}.get(parts.scheme, "")
    return f"{parts.scheme}://{host.removesuffix(default_port) if default_port else host}/robots.txt"


def _has_group(parser: Protego, agent: str) -> bool:
    """Whether a group of the robots.txt names `agent` itself (not '*'); protego does not expose it, so True when unsure."""
    try:
        rules = parser._get_matching_rule_set(agent)
        return rules is not None and rules.user_agent != "*"
    except AttributeError:  # another protego release: every name counts, the stricter reading
        return True


def _deciding_rule(parser: Protego, url: str, agent: str) -> str:
    """The group and rule that decide `url` for `agent`, as a person writes them; protego does not expose them, so best effort."""
    try:
        from protego._utils import _quote_path

        rules = parser._get_matching_rule_set(agent)
        path = _quote_path(url)
        rule = next(r for r in rules._rules if r.value.match(path))
        return f"rule '{rule.field.capitalize()}: {unquote(rule.value._pattern)}' for User-agent {rules.user_agent}"
    except (ImportError, AttributeError, StopIteration, TypeError):  # another protego release: name the agent alone
        return f"for {agent}"


@dataclass(frozen=True)
class RobotsFile:
    """One origin's robots.txt as fetched: its rules, no rules (4xx), or why it could not be read."""

    url: str
    parser: Protego | None = None  # None with `unavailable` None: every path is allowed
    unavailable: str | None = None  # why it could not be read ("HTTP Error 503", "timed out"): its origin's rows wait
    fetched: float = 0.0  # time.monotonic() when fetched
    size: int = 0  # bytes of robots.txt text parsed: what the cache counts against its byte bound

    @classmethod
    def from_answer(cls, url: str, status: int | None, body: bytes = b"", error: str | None = None) -> RobotsFile:
        """What an answer to a robots.txt request means: rules (2xx), none (4xx other than 429), or unavailable."""
        now = time.monotonic()
        if status is not None and 200 <= status < 300:  # utf-8-sig: a leading BOM is not part of the first line (Google)
            text = body[:ROBOTS_MAX_BYTES]
            return cls(url, Protego.parse(text.decode("utf-8-sig", "replace")), fetched=now, size=len(text))
        if status is not None and 400 <= status < 500 and status != 429:
            return cls(url, fetched=now)
        return cls(url, unavailable=error or f"HTTP Error {status}", fetched=now)

    def refusal(self, url: str, agents: tuple[str, ...]) -> str | None:
        """Why this robots.txt keeps `url` from being fetched by `agents`, or None when it may be."""
        if self.unavailable is not None:
            return (f"{ROBOTS_UNAVAILABLE}: {self.url} could not be read ({self.unavailable}); the host's rows are not "
                    f"fetched this time (`dallekit download --retry-failed` fetches them later)")
        if self.parser is None:
            return None
        named = [agent for agent in agents if _has_group(self.parser, agent)]
        for agent in named or agents[:1]:  # the groups that name one of us; '*' when none does (RFC 9309)
            if not self.parser.can_fetch(url, agent):
                return f"{ROBOTS_DISALLOWED}: {self.url} {_deciding_rule(self.parser, url, agent)}"
        return None

    def expired(self, now: float) -> bool:
        """Whether it is time to fetch the robots.txt again."""
        return now - self.fetched > (ROBOTS_ERROR_TTL if self.unavailable is not None else ROBOTS_TTL)


class RobotsCache:
    """This process's robots.txt files, per origin: each fetched once by one thread while the others wait, kept for its TTL.

    At most `size` files, and files of at most `max_bytes` of text in all, are kept (the least
    recently used go first), so memory does not grow with the number of hosts a long download
    meets, nor with how large their robots.txt files are.
    """

    def __init__(self, size: int = 4096, max_bytes: int = ROBOTS_CACHE_BYTES):
        self.size, self.max_bytes, self._bytes = size, max_bytes, 0
        self._files: collections.OrderedDict[str, RobotsFile] = collections.OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, url: str, load: Callable[[str], RobotsFile]) -> RobotsFile:
        """The robots.txt that rules `url`, calling `load(robots_url)` when it is not cached or has expired."""
        key = robots_url(url)
        while True:
            with self._lock:
                cached = self._files.get(key)
                if cached is not None and not cached.expired(time.monotonic()):
                    self._files.move_to_end(key)
                    return cached
                waiting = self._loading.get(key)
                if waiting is None:
                    self._loading[key] = threading.Event()
                    break
            waiting.wait()
        try:
            loaded = load(key)
            with self._lock:
                self._store(key, loaded)
        finally:  # waiters wake even when the load failed: one of them loads it then
            with self._lock:
                self._loading.pop(key).set()
        return loaded

    def _store(self, key: str, loaded: RobotsFile) -> None:
        """Keep `loaded` (under the lock), forgetting the least recently used files beyond the bounds; the newest always stays."""
        old = self._files.pop(key, None)
        self._bytes += loaded.size - (old.size if old else 0)
        self._files[key] = loaded
        while len(self._files) > 1 and (len(self._files) > self.size or self._bytes > self.max_bytes):
            self._bytes -= self._files.popitem(last=False)[1].size
