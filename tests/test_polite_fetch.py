"""The download's polite opener against loopback hosts (127.0.0.2-9): robots.txt, per-host limits, Retry-After, backoff, no hang."""

from __future__ import annotations

import datetime
import email.utils
import threading
import time
from multiprocessing.pool import ThreadPool

import pytest

from dallekit.demo.hosts import HostRules, LoopbackHost
from dallekit.demo.synthetic import Route
from dallekit.pipeline.fetch import URL_RATE_LIMITED_TRIES, FetchPolicy, PoliteOpener, host_key
from dallekit.pipeline.optouts import ROBOTS_DISALLOWED, ROBOTS_UNAVAILABLE, TDM_REFUSED, X_ROBOTS_REFUSED, RobotsCache
from dallekit.pipeline.politeness import HOST_SILENT, RATE_LIMITED, SILENT_LIMIT, HostLimits, Hosts, retry_after_seconds

IMAGE = b"image bytes"  # the opener never decodes
PRIVATE = "User-agent: *\nDisallow: /private/\n"


def images(paths, **route) -> dict[str, Route]:
    return {p: Route(IMAGE, **route) for p in paths}


def polite(max_bytes: int = 1 << 20, **policy) -> PoliteOpener:
    """An opener with its own robots.txt cache and host state, as a fresh worker process has."""
    return PoliteOpener(FetchPolicy(max_bytes, **policy), RobotsCache(), Hosts())


def fetch(opener: PoliteOpener, url: str, timeout: float = 5.0):
    """The body, or the exception's text as img2dataset would store it."""
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.read()
    except Exception as err:  # noqa: BLE001 - img2dataset records str(err) of anything
        return str(err)


def fetch_all(opener: PoliteOpener, urls: list[str], threads: int = 16, timeout: float = 5.0) -> list:
    with ThreadPool(threads) as pool:
        return pool.map(lambda url: fetch(opener, url, timeout), urls)


def test_disallowed_paths_are_never_requested_and_robots_txt_is_read_once():
    paths = [f"/private/{i}.jpg" for i in range(10)] + [f"/public/{i}.jpg" for i in range(10)]
    with LoopbackHost("127.0.0.2", images(paths), HostRules(robots_txt=PRIVATE)) as host:
        results = fetch_all(polite(), [host.url(p) for p in paths])
        assert results[10:] == [IMAGE] * 10
        assert all(r.startswith(f"{ROBOTS_DISALLOWED}: {host.url('/robots.txt')} rule 'Disallow: /private/'") for r in results[:10])
        assert not any(host.by_path[p] for p in paths[:10]) and host.by_path["/robots.txt"] == 1


def test_robots_txt_ignore_fetches_everything_and_never_asks_for_it():
    with LoopbackHost("127.0.0.2", images(["/private/a.jpg"]), HostRules(robots_txt=PRIVATE)) as host:
        assert fetch(polite(robots_txt=False), host.url("/private/a.jpg")) == IMAGE
        assert host.by_path["/robots.txt"] == 0


def test_a_missing_robots_txt_allows_everything():
    with LoopbackHost("127.0.0.3", images(["/a.jpg"])) as host:
        assert fetch(polite(), host.url("/a.jpg")) == IMAGE and host.by_path["/robots.txt"] == 1


@pytest.mark.parametrize("rules, timeout, why", [
    (HostRules(robots_txt=PRIVATE, robots_status=503), 10, "HTTP Error 503"),
    (HostRules(robots_txt=PRIVATE, robots_delay=3.0), 0.5, "timed out"),
])
def test_a_robots_txt_that_errors_or_is_too_slow_keeps_the_hosts_rows_for_later(rules, timeout, why):
    with LoopbackHost("127.0.0.4", images(["/a.jpg", "/b.jpg"]), rules) as host:
        results = fetch_all(polite(), [host.url("/a.jpg"), host.url("/b.jpg")], timeout=timeout)
        assert all(r.startswith(ROBOTS_UNAVAILABLE) and why in r for r in results), results
        assert host.by_path["/a.jpg"] == host.by_path["/b.jpg"] == 0 and host.by_path["/robots.txt"] == 1


def test_a_slow_robots_txt_within_the_timeout_is_obeyed():
    with LoopbackHost("127.0.0.4", images(["/private/a.jpg", "/b.jpg"]), HostRules(robots_txt=PRIVATE, robots_delay=0.3)) as host:
        results = fetch_all(polite(), [host.url("/private/a.jpg"), host.url("/b.jpg")], timeout=5)
        assert results[0].startswith(ROBOTS_DISALLOWED) and results[1] == IMAGE


@pytest.mark.parametrize("connections", [4, 2])
def test_a_host_never_sees_more_requests_in_flight_than_the_limit(connections):
    paths = [f"/{i}.jpg" for i in range(24)]
    rules = HostRules(max_in_flight=connections, service_time=0.05)  # a 429 for any request over the limit
    with LoopbackHost("127.0.0.5", images(paths), rules) as host:
        results = fetch_all(polite(limits=HostLimits(connections=connections)), [host.url(p) for p in paths])
        assert results == [IMAGE] * len(paths)
        assert host.peak_in_flight <= connections and host.statuses[429] == 0


def test_a_rate_limited_host_gets_every_row_with_the_defaults():
    paths = [f"/{i}.jpg" for i in range(30)]
    with LoopbackHost("127.0.0.6", images(paths), HostRules(rate_limit=20, burst=3)) as host:
        results = fetch_all(polite(), [host.url(p) for p in paths])
        assert results == [IMAGE] * len(paths), [r for r in results if r != IMAGE][:3]
        assert host.statuses[200] == len(paths)


@pytest.mark.parametrize("as_date", [False, True])
def test_retry_after_pauses_the_host_in_both_forms(as_date):
    paths = [f"/{i}.jpg" for i in range(6)]
    with LoopbackHost("127.0.0.7", images(paths), HostRules(rate_limit=2, burst=2, retry_after="1", retry_after_date=as_date)) as host:
        results = fetch_all(polite(), [host.url(p) for p in paths])
        assert results == [IMAGE] * len(paths)
        # each 429 paused the host: the tries that met a 429 came back once, not URL_RATE_LIMITED_TRIES times each
        assert host.statuses[429] <= 2 * HostLimits().connections


def test_retry_after_values_and_the_cap():
    now = time.time()
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    noon = datetime.datetime(2026, 12, 6, 12, tzinfo=datetime.timezone.utc).timestamp()
    assert retry_after_seconds("Sun, 06 Dec 2026 12:00:30 -0000", noon) == 30.0  # -0000 is UTC, not local time
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None and retry_after_seconds("-5") is None
    hosts, limits = Hosts(), HostLimits(max_retry_after=2)
    started = hosts.acquire("h:80", limits)
    hosts.release("h:80", started, limits, "limited", retry_after=3600)
    assert hosts._host("h:80").paused_until - time.monotonic() <= 2


def test_a_url_that_is_always_429_fails_as_rate_limited_after_its_tries():
    with LoopbackHost("127.0.0.8", {"/busy.jpg": Route(b"slow down", 429)}) as host:
        result = fetch(polite(robots_txt=False), host.url("/busy.jpg"))
        assert result.startswith(f"{RATE_LIMITED}: HTTP Error 429") and host.by_path["/busy.jpg"] == URL_RATE_LIMITED_TRIES


@pytest.mark.parametrize("retries", [0, 2])
def test_server_errors_are_retried_with_backoff_as_many_times_as_asked(retries):
    with LoopbackHost("127.0.0.8", {"/err.jpg": Route(b"oops", 500), "/bare503.jpg": Route(b"down", 503)}) as host:
        opener = polite(robots_txt=False, retries=retries)
        assert fetch(opener, host.url("/err.jpg"), timeout=10) == "HTTP Error 500: Internal Server Error"
        assert fetch(opener, host.url("/bare503.jpg"), timeout=10) == "HTTP Error 503: Service Unavailable"
        assert host.by_path["/err.jpg"] == host.by_path["/bare503.jpg"] == retries + 1  # a bare 503 is a server error, not a pace


def test_a_retry_whose_backoff_does_not_fit_the_timeout_is_not_tried():
    with LoopbackHost("127.0.0.8", {"/err.jpg": Route(b"oops", 500)}) as host:
        assert fetch(polite(robots_txt=False, retries=5), host.url("/err.jpg"), timeout=0.2).startswith("HTTP Error 500")
        assert host.by_path["/err.jpg"] == 1  # the first backoff (0.25-0.5 s) is longer than what is left of 0.2 s


def test_an_opt_out_on_any_hop_of_a_redirect_counts():
    with LoopbackHost("127.0.0.2", images(["/img.jpg"]) | {"/private/img.jpg": Route(IMAGE)}, HostRules(robots_txt=PRIVATE)) as target:
        hops = {
            "/noai": Route(b"", 302, {"Location": target.url("/img.jpg"), "X-Robots-Tag": "img2dataset: noai"}),
            "/tdm": Route(b"", 301, {"Location": target.url("/img.jpg"), "tdm-reservation": "1, 1"}),
            "/private": Route(b"", 302, {"Location": target.url("/private/img.jpg")}),
            "/fine": Route(b"", 307, {"Location": target.url("/img.jpg")}),
        }
        with LoopbackHost("127.0.0.3", hops) as start:
            opener = polite(header_directives=frozenset({"noai"}))
            assert fetch(opener, start.url("/noai")) == f"{X_ROBOTS_REFUSED}: noai"
            assert fetch(opener, start.url("/tdm")) == TDM_REFUSED
            assert fetch(opener, start.url("/private")).startswith(ROBOTS_DISALLOWED)
            assert fetch(opener, start.url("/fine")) == IMAGE
            assert target.by_path["/img.jpg"] == 1 and target.by_path["/private/img.jpg"] == 0


def test_a_host_that_never_answers_is_given_up_and_the_rows_end_within_their_bound():
    with LoopbackHost("127.0.0.9", rules=HostRules(silent=True)) as host:
        urls = [host.url(f"/{i}.jpg") for i in range(40)]
        results: list = []
        done = threading.Thread(target=lambda: results.extend(fetch_all(polite(robots_txt=False), urls, timeout=0.5)), daemon=True)
        done.start()
        # the bound: SILENT_LIMIT requests time out, 4 at a time, then the rest fail at once; 30 s is far above it
        done.join(30)
        assert not done.is_alive(), "the download hung on a host that never answers"
        timed_out = [r for r in results if "timed out" in r]
        assert len(timed_out) <= SILENT_LIMIT + HostLimits().connections
        assert all(r.startswith(HOST_SILENT) for r in results if r not in timed_out) and len(results) == len(urls)


def test_a_host_whose_robots_txt_never_answers_costs_one_timeout():
    with LoopbackHost("127.0.0.9", rules=HostRules(silent=True)) as host:
        results = fetch_all(polite(), [host.url(f"/{i}.jpg") for i in range(20)], timeout=0.5)
        assert all(r.startswith(ROBOTS_UNAVAILABLE) and "timed out" in r for r in results)


def test_hosts_are_told_apart_by_name_and_port():
    assert host_key("http://Example.com/a") == "example.com:80" and host_key("https://example.com:8443/a") == "example.com:8443"
    assert host_key("http://127.0.0.2:5000/a") != host_key("http://127.0.0.3:5000/a")


def test_what_kept_a_row_is_retried_only_when_it_may_pass():
    from dallekit.pipeline.retry import is_retryable

    for message in (f"{RATE_LIMITED}: HTTP Error 429: Too Many Requests from h, 4 times for this URL",
                    f"{HOST_SILENT}: h:80 left 8 requests in a row unanswered", f"{ROBOTS_UNAVAILABLE}: http://h/robots.txt ..."):
        assert is_retryable("failed_to_download", message), message
    for message in (f"{ROBOTS_DISALLOWED}: http://h/robots.txt rule 'Disallow: /'", f"{X_ROBOTS_REFUSED}: noai", TDM_REFUSED):
        assert not is_retryable("failed_to_download", message), message


@pytest.mark.slow
def test_the_download_stage_counts_what_sites_said_and_clean_names_it(tmp_path, client):
    from PIL import Image

    from dallekit.config import CleanConfig, DownloadConfig
    from dallekit.demo.synthetic import encode
    from dallekit.pipeline.clean import clean
    from dallekit.pipeline.download import download
    from tests.helpers import check_accounting, read_stage
    from tests.test_download import make_url_shards

    def jpeg(i):
        return Route(encode(Image.new("RGB", (64, 64), (40 * i % 256, 90, 200))), headers={"Content-Type": "image/jpeg"})

    routes = {f"/private/{i}.jpg": jpeg(i) for i in range(3)} | {f"/{i}.jpg": jpeg(i + 3) for i in range(3)}
    routes["/noai.jpg"] = Route(routes["/0.jpg"].body, headers={"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"})
    with LoopbackHost("127.0.0.2", routes, HostRules(robots_txt=PRIVATE, rate_limit=4, burst=2)) as host:
        urls = [host.url(p) for p in routes]
        shards = make_url_shards(tmp_path, client, urls, shard_size=4)
        stats = download(str(shards), str(tmp_path / "images"), DownloadConfig(threads=4, timeout=5), client)
        check_accounting(tmp_path / "images", len(urls))
        assert stats["counters"]["outcome"] == {"robots_txt": 3, "opted_out": 1} and stats["config"]["robots_txt"] == "obey"
        assert stats["counters"]["status"] == {"success": 3, "failed_to_download": 4}  # the rate limit cost no row
        assert not any(host.by_path[f"/private/{i}.jpg"] for i in range(3))
        clean(str(tmp_path / "images"), str(tmp_path / "clean"), CleanConfig(near_dup_distance=-1), client)
        _, rejects, _ = read_stage(tmp_path / "clean")
        assert sorted(rejects["reason"]) == ["opted_out", "robots_txt", "robots_txt", "robots_txt"]
        ignored = download(str(shards), str(tmp_path / "ignored"), DownloadConfig(threads=4, timeout=5, robots_txt="ignore"), client)
        assert ignored["config"]["robots_txt"] == "ignore" and ignored["counters"]["status"]["success"] == 6


def test_a_worker_remembers_a_bounded_number_of_hosts():
    hosts, limits = Hosts(size=3), HostLimits()
    busy = hosts.acquire("busy:80", limits)  # in flight: never forgotten
    for i in range(10):
        name = f"h{i}:80"
        hosts.release(name, hosts.acquire(name, limits), limits, "ok")
    assert len(hosts._hosts) <= 3 and "busy:80" in hosts._hosts
    hosts.release("busy:80", busy, limits, "ok")
