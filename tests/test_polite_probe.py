"""Hostile-but-fair inputs to the polite opener: odd robots.txt files, Location and Retry-After headers (loopback hosts)."""

from __future__ import annotations

import io
import time
from multiprocessing.pool import ThreadPool

import pytest
from PIL import Image

from dallekit.demo.hosts import HostRules, LoopbackHost
from dallekit.demo.synthetic import Route, ShapesServer
from dallekit.pipeline.optouts import ROBOTS_DISALLOWED, ROBOTS_UNAVAILABLE, RobotsCache, RobotsFile, agent_names, robots_url
from dallekit.pipeline.politeness import RATE_LIMITED, retry_after_seconds
from tests.test_polite_fetch import IMAGE, PRIVATE, fetch, polite


def test_a_robots_txt_larger_than_max_image_bytes_is_read_up_to_its_own_limit():
    big = PRIVATE + "#" * 200_000  # a Content-Length above the image cap below, well under ROBOTS_MAX_BYTES
    routes = {"/private/a.jpg": Route(IMAGE), "/b.jpg": Route(IMAGE)}
    with LoopbackHost("127.0.0.2", routes, HostRules(robots_txt=big)) as host:
        opener = polite(max_bytes=100_000)
        assert fetch(opener, host.url("/b.jpg")) == IMAGE
        assert fetch(opener, host.url("/private/a.jpg")).startswith(ROBOTS_DISALLOWED)
        assert host.by_path["/private/a.jpg"] == 0


def test_a_robots_txt_that_starts_with_a_byte_order_mark_is_obeyed():
    routes = {"/private/a.jpg": Route(IMAGE)}
    with LoopbackHost("127.0.0.3", routes, HostRules(robots_txt="\ufeff" + PRIVATE)) as host:
        assert fetch(polite(), host.url("/private/a.jpg")).startswith(ROBOTS_DISALLOWED)
        assert host.by_path["/private/a.jpg"] == 0


def test_a_redirect_to_a_location_with_a_space_or_utf8_bytes_is_followed_percent_encoded():
    # the handler writes headers as Latin-1: '/caf\xc3\xa9' goes out as the UTF-8 bytes of '/café'
    routes = {"/space": Route(b"", 302, {"Location": "/a b.jpg"}), "/utf8": Route(b"", 302, {"Location": "/caf\xc3\xa9.jpg"}),
              "/a%20b.jpg": Route(IMAGE), "/caf%C3%A9.jpg": Route(IMAGE)}
    with LoopbackHost("127.0.0.4", routes) as host:
        opener = polite()
        assert fetch(opener, host.url("/space")) == IMAGE
        assert fetch(opener, host.url("/utf8")) == IMAGE


def test_a_retry_after_of_non_ascii_digits_reads_as_absent_and_the_row_ends_rate_limited():
    assert retry_after_seconds("\xb2") is None  # '²' passes str.isdigit, and float() refuses it
    routes = {"/a.jpg": Route(b"slow down", 429, {"Retry-After": "\xb2"})}
    with LoopbackHost("127.0.0.5", routes) as host:
        assert fetch(polite(), host.url("/a.jpg")).startswith(RATE_LIMITED)


def test_a_robots_txt_redirecting_to_a_local_file_is_not_read_even_with_file_urls_allowed(tmp_path):
    local = tmp_path / "robots.txt"
    local.write_text("User-agent: *\nAllow: /\n")
    routes = {"/robots.txt": Route(b"", 301, {"Location": local.as_uri()}), "/a.jpg": Route(IMAGE)}
    with ShapesServer(routes, address="127.0.0.6") as host:
        result = fetch(polite(allow_file_urls=True), host.url("/a.jpg"))
        assert result.startswith(ROBOTS_UNAVAILABLE) and "redirect to a URL scheme not allowed: file:" in result, result


def test_a_site_that_allow_lists_the_user_agent_token_lets_it_fetch():
    """A site naming our --user-agent-token in a group that allows it while '*' is disallowed means: this bot may fetch.

    'img2dataset', having no group of its own, does not fall back to '*' when another of our names has one.
    """
    text = "User-agent: mybot\nAllow: /\n\nUser-agent: *\nDisallow: /\n"
    robots = RobotsFile.from_answer("http://h/robots.txt", 200, text.encode())
    assert robots.refusal("http://h/a.jpg", agent_names("mybot")) is None
    assert robots.refusal("http://h/a.jpg", agent_names(None)) is not None  # without the token, '*' applies
    both = "User-agent: mybot\nAllow: /\n\nUser-agent: img2dataset\nDisallow: /\n"  # a group naming img2dataset still counts
    assert RobotsFile.from_answer("http://h/robots.txt", 200, both.encode()).refusal("http://h/a.jpg", agent_names("mybot"))


def _png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 48), (shade, 90, 160)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.slow
def test_download_then_clean_and_retry_failed_sort_robots_and_opt_out_rows(tmp_path, client):
    from dallekit.config import CleanConfig, DownloadConfig
    from dallekit.pipeline.clean import clean
    from dallekit.pipeline.download import download
    from dallekit.pipeline.retry import retry_failed
    from tests.helpers import check_accounting, read_stage
    from tests.test_download import make_url_shards

    routes = {"/ok.png": Route(_png(10)), "/private/a.png": Route(_png(20)), "/noai.png": Route(_png(30), headers={"X-Robots-Tag": "noai"})}
    with LoopbackHost("127.0.0.2", routes, HostRules(robots_txt=PRIVATE)) as ruled, \
         LoopbackHost("127.0.0.3", {"/c.png": Route(_png(40))}, HostRules(robots_txt="x", robots_status=503)) as failing:
        urls = [ruled.url(p) for p in routes] + [failing.url("/c.png")]
        shards = make_url_shards(tmp_path, client, urls, shard_size=2)
        stats = download(str(shards), str(tmp_path / "images"), DownloadConfig(threads=4, timeout=3, image_size=32), client)
        check_accounting(tmp_path / "images", len(urls))
        assert stats["counters"]["outcome"] == {"robots_txt": 1, "opted_out": 1, "robots_txt_unavailable": 1}
        clean(str(tmp_path / "images"), str(tmp_path / "clean"), CleanConfig(), client)  # it raised AttributeError on any download
        assert read_stage(tmp_path / "clean")[1]["reason"].value_counts().to_dict() == {
            "robots_txt": 1, "opted_out": 1, "failed_to_download": 1}
        ruled.reset_counters()
        failing.reset_counters()
        retry_failed(str(tmp_path / "images"), client, {"threads": 2})
        assert ruled.requests == 0 and failing.by_path["/robots.txt"] <= 1  # only the unreadable robots.txt's row is retried


def test_a_hop_that_reaches_a_host_with_little_time_left_does_not_make_its_robots_txt_unavailable_for_every_row():
    robots = HostRules(robots_txt="User-agent: *\nAllow: /\n", robots_delay=0.6)
    with LoopbackHost("127.0.0.3", {"/img.jpg": Route(IMAGE)}, robots) as cdn, \
         LoopbackHost("127.0.0.2", {"/slow": Route(b"", 302, {"Location": cdn.url("/img.jpg")}, delay=1.6)}) as origin:
        opener = polite()
        fetch(opener, origin.url("/slow"), timeout=2.0)  # reaches the CDN with 0.4 s left: this row may time out
        assert fetch(opener, cdn.url("/img.jpg"), timeout=2.0) == IMAGE  # the CDN's own rows are not refused for it


def test_a_hosts_robots_txt_is_fetched_once_whatever_the_case_of_its_name():
    routes = {"/a.jpg": Route(IMAGE), "/b.jpg": Route(IMAGE)}
    with LoopbackHost("127.0.0.1", routes) as host:
        opener = polite()
        assert fetch(opener, f"http://localhost:{host.port}/a.jpg") == fetch(opener, f"http://LOCALHOST:{host.port}/b.jpg") == IMAGE
        assert host.by_path["/robots.txt"] == 1


def test_the_robots_cache_is_bounded_by_the_bytes_of_its_files_not_only_their_number():
    loads = []

    def load(url):
        loads.append(url)
        return RobotsFile.from_answer(url, 200, b"User-agent: *\nDisallow: /p\n" + b"#" * 600)  # protego keeps ~40x its text

    cache = RobotsCache(size=100, max_bytes=1000)
    for url in ("http://a.test/1", "http://b.test/1", "http://a.test/2"):
        cache.get(url, load)
    assert loads == ["http://a.test/robots.txt", "http://b.test/robots.txt", "http://a.test/robots.txt"]


class _BusyAtFirst(LoopbackHost):
    """A host that answers 429 (no Retry-After) to every image request during its first second, then serves."""

    def _route(self, path):
        if path != "/robots.txt":
            self.first = getattr(self, "first", None) or time.monotonic()
            if time.monotonic() - self.first < 1.0:
                return Route(b"busy", 429)
        return super()._route(path)


def test_a_host_that_is_busy_for_a_second_loses_no_row_while_its_rate_comes_down():
    paths = [f"/{i}.jpg" for i in range(8)]
    with _BusyAtFirst("127.0.0.7", {p: Route(IMAGE) for p in paths}) as host, ThreadPool(8) as pool:
        opener = polite()
        results = pool.map(lambda p: fetch(opener, host.url(p)), paths)
        assert results == [IMAGE] * len(paths), [r for r in results if r != IMAGE][:2]


def test_an_origin_written_with_its_default_port_has_the_same_robots_txt():
    assert robots_url("http://h.test:80/a.jpg") == robots_url("http://H.test/b.jpg") == "http://h.test/robots.txt"
    assert robots_url("https://[::1]:443/a.jpg") == "https://[::1]/robots.txt"
    assert robots_url("http://h.test:8080/a.jpg") == "http://h.test:8080/robots.txt"
