"""The loopback test hosts (dallekit/demo/hosts.py): distinct addresses, robots.txt, limits, counters, silence."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from dallekit.demo.hosts import HostRules, LoopbackHost
from dallekit.demo.synthetic import Route

PAGE = {"/a": Route(b"page a")}


def get(url: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_two_addresses_are_two_hosts_that_count_separately():
    with LoopbackHost("127.0.0.2", PAGE) as first, LoopbackHost("127.0.0.3", {"/b": Route(b"page b")}, port=first.port) as second:
        assert second.port == first.port  # the same port: only the address tells them apart
        assert get(first.url("/a"))[::2] == (200, b"page a")
        assert get(second.url("/a"))[0] == 404
        assert get(second.url("/b?x=1"))[::2] == (200, b"page b")
        assert (first.requests, second.requests) == (1, 2)
        assert first.by_path == {"/a": 1} and second.by_path == {"/a": 1, "/b": 1}
        assert first.statuses == {200: 1} and second.statuses == {404: 1, 200: 1}
        second.reset_counters()
        assert (second.requests, second.by_path, second.statuses, first.requests) == (0, {}, {}, 1)


@pytest.mark.parametrize("address", ["10.0.0.1", "0.0.0.0", "::1"])
def test_only_loopback_ipv4_addresses_are_served(address):
    with pytest.raises(ValueError):
        LoopbackHost(address)


def test_robots_txt_served_missing_and_failing():
    robots = "User-agent: *\nDisallow: /private/\n"
    with LoopbackHost("127.0.0.2", PAGE, HostRules(robots_txt=robots)) as served, LoopbackHost("127.0.0.3", PAGE) as missing, \
            LoopbackHost("127.0.0.4", PAGE, HostRules(robots_txt="down", robots_status=503)) as failing:
        assert get(served.url("/robots.txt"))[::2] == (200, robots.encode())
        assert get(missing.url("/robots.txt"))[0] == 404
        assert get(failing.url("/robots.txt"))[::2] == (503, b"down")
        assert [h.by_path["/robots.txt"] for h in (served, missing, failing)] == [1, 1, 1]


def test_a_burst_above_the_bucket_gets_429_with_retry_after():
    # a refill of one token per 100 s: the bucket stays empty for the whole test
    with LoopbackHost("127.0.0.2", PAGE, HostRules(robots_txt="", rate_limit=0.01, burst=3, retry_after="1")) as limited, \
            LoopbackHost("127.0.0.3", PAGE, HostRules(rate_limit=0.01, burst=1)) as bare:
        answers = [get(limited.url("/a")) for _ in range(6)]
        assert [status for status, _, _ in answers] == [200, 200, 200, 429, 429, 429]
        assert all(headers.get("Retry-After") == "1" for _, headers, _ in answers[3:])
        assert get(limited.url("/robots.txt"))[0] == 200  # robots.txt is answered outside the limit
        assert limited.statuses == {200: 4, 429: 3}
        assert [get(bare.url("/a"))[0] for _ in range(2)] == [200, 429]
        assert "Retry-After" not in get(bare.url("/a"))[1]


def concurrently(urls: list[str]) -> list[int]:
    """The statuses of GETs of urls, all sent at once from their own threads."""
    statuses = [0] * len(urls)
    barrier = threading.Barrier(len(urls))

    def fetch(i: int) -> None:
        barrier.wait()
        statuses[i] = get(urls[i])[0]

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_peak_in_flight_counts_concurrent_requests():
    with LoopbackHost("127.0.0.2", PAGE, HostRules(service_time=1.0)) as host:
        assert concurrently([host.url("/a")] * 4) == [200] * 4
        assert host.peak_in_flight == 4
        host.reset_counters()
        get(host.url("/a"))
        get(host.url("/a"))
        assert (host.requests, host.peak_in_flight) == (2, 1)  # one after the other: never two at once


def test_max_in_flight_refuses_the_requests_above_it():
    with LoopbackHost("127.0.0.2", PAGE, HostRules(service_time=1.5, max_in_flight=2, retry_after="3")) as host:
        assert sorted(concurrently([host.url("/a")] * 4)) == [200, 200, 429, 429]
        assert host.statuses == {200: 2, 429: 2}  # (a 429 leaves at once, so the peak may be 3 or 4)


def test_silent_host_accepts_connections_and_never_answers():
    with LoopbackHost("127.0.0.2", PAGE, HostRules(silent=True)) as host:
        with pytest.raises((TimeoutError, urllib.error.URLError)) as raised:
            urllib.request.urlopen(host.url("/a"), timeout=0.5)  # noqa: S310 - loopback only
        error = raised.value
        assert isinstance(error, TimeoutError) or isinstance(error.reason, TimeoutError)
        assert host.requests == 0
