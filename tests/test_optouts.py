"""optouts: X-Robots-Tag (Google's rules), TDMRep and robots.txt (RFC 9309 via protego), each against its spec's own examples."""

from __future__ import annotations

import datetime
import email.message

import pytest

from dallekit.pipeline.optouts import (
    ROBOTS_DISALLOWED,
    ROBOTS_UNAVAILABLE,
    TDM_REFUSED,
    X_ROBOTS_REFUSED,
    RobotsCache,
    RobotsFile,
    agent_names,
    header_opt_out,
    robots_url,
    tdm_reserved,
    x_robots_directives,
)

AGENTS = agent_names(None)  # ("img2dataset",)
NOW = datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc)
DEFAULT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})


def headers(*pairs: tuple[str, str]) -> email.message.Message:
    """Response headers as urllib gives them, repeated names kept apart."""
    message = email.message.Message()
    for name, value in pairs:
        message[name] = value
    return message


@pytest.mark.parametrize("values, expected", [
    # Google's examples (developers.google.com/search/docs/crawling-indexing/robots-meta-tag)
    (["noindex"], {"noindex"}),
    (["noindex, nofollow"], {"noindex", "nofollow"}),
    (["noimageindex", "unavailable_after: 25 Jun 2010 15:00:00 PST"], {"noimageindex", "unavailable_after", "noindex"}),
    (["none"], {"none", "noindex", "nofollow"}),
    (["googlebot: nofollow", "otherbot: noindex, nofollow"], set()),  # neither bot is us
    # the cases img2dataset's split at the first colon got wrong (issue 31)
    (["noai, unavailable_after: 25 Jun 2030 15:00:00 PST"], {"noai", "unavailable_after"}),
    (["max-image-preview: none, noai"], {"max-image-preview", "noai"}),
])
def test_x_robots_tag_follows_googles_examples(values, expected):
    assert x_robots_directives(values, AGENTS, NOW) == expected


def test_x_robots_tag_bot_prefix_applies_to_the_directives_after_it_up_to_the_next():
    values = ["noimageai, otherbot: noai, noindex, img2dataset: nofollow, max-snippet: 20"]
    assert x_robots_directives(values, AGENTS, NOW) == {"noimageai", "nofollow", "max-snippet"}
    assert x_robots_directives(["  IMG2DATASET :  NoAI "], AGENTS, NOW) == {"noai"}  # names and spaces as people write them
    assert x_robots_directives(["mybot: noai"], agent_names("MyBot"), NOW) == {"noai"}  # the --user-agent-token is ours too


def test_unavailable_after_is_noindex_only_once_its_date_has_passed_in_each_date_form():
    for date in ("Friday, 25-Jun-10 15:00:00 GMT", "Fri, 25 Jun 2010 15:00:00 GMT", "2010-06-25T15:00:00Z", "2010-06-25"):
        assert "noindex" in x_robots_directives([f"unavailable_after: {date}"], AGENTS, NOW), date
    assert "noindex" not in x_robots_directives(["unavailable_after: Friday, 25-Jun-38 15:00:00 GMT"], AGENTS, NOW)
    assert "noindex" not in x_robots_directives(["unavailable_after: whenever"], AGENTS, NOW)  # an unreadable date is ignored


@pytest.mark.parametrize("values, reserved", [
    (["1"], True), (["0"], False), (["1, 1"], True), (["0, 1"], True), (["0", "1"], True), ([" 1 "], True),
    (["2"], False), (["yes"], False), ([], False),
])
def test_tdm_reservation_is_reserved_when_any_value_is_1(values, reserved):
    assert tdm_reserved(values) is reserved


def test_header_opt_out_names_the_directives_and_the_tdm_policy():
    refusal = header_opt_out(headers(("X-Robots-Tag", "noai, unavailable_after: 25 Jun 2030 15:00:00 PST")), AGENTS,
                             DEFAULT_DIRECTIVES, True)
    assert refusal == f"{X_ROBOTS_REFUSED}: noai"
    refusal = header_opt_out(headers(("tdm-reservation", "1, 1"), ("tdm-policy", "https://example.com/tdm.json")), AGENTS,
                             DEFAULT_DIRECTIVES, True)
    assert refusal == f"{TDM_REFUSED}; policy https://example.com/tdm.json"
    assert header_opt_out(headers(("tdm-reservation", "1")), AGENTS, DEFAULT_DIRECTIVES, False) is None
    assert header_opt_out(headers(("X-Robots-Tag", "noai")), AGENTS, frozenset(), True) is None
    assert header_opt_out(headers(("X-Robots-Tag", "nofollow, max-image-preview: large")), AGENTS, DEFAULT_DIRECTIVES, True) is None


RFC_ROBOTS = """\
User-agent: *
Disallow: *.gif$
Disallow: /example/
Allow: /publications/

User-agent: foobot
Disallow:/
Allow:/example/page.html
Allow:/example/allowed.gif

User-agent: img2dataset
Disallow: /no-ai/
Allow: /no-ai/fine
"""


def robots(text: str) -> RobotsFile:
    return RobotsFile.from_answer("http://h.test/robots.txt", 200, text.encode())


@pytest.mark.parametrize("path, agent, allowed", [
    ("/example/page.html", None, True),  # img2dataset's own group applies, not '*'
    ("/no-ai/photo.jpg", None, False),
    ("/no-ai/fine.jpg", None, True),  # the longer Allow wins
    ("/example/page.html", "foobot", True),  # RFC 9309's example: the longest match wins
    ("/example/allowed.gif", "foobot", True),
    ("/example/disallowed.gif", "foobot", False),
    ("/photos/x.gif", "otherbot", False),  # otherbot has no group: '*' applies, and '*.gif$' matches
    ("/photos/x.gif?a=1", "otherbot", True),  # '$' anchors the end
    ("/publications/x.gif", "otherbot", True),  # the longer Allow beats '*.gif$'

    ("/example/x.jpg", "otherbot", False),
])
def test_robots_txt_groups_wildcards_and_precedence_follow_rfc_9309(path, agent, allowed):
    rules = robots(RFC_ROBOTS)
    # the token's group and img2dataset's must both allow; with a token, check the token's group alone by removing ours
    agents = agent_names(agent)[:1] if agent else AGENTS
    refusal = rules.refusal(f"http://h.test{path}", agents)
    assert (refusal is None) is allowed, refusal


def test_a_robots_refusal_names_the_rule_and_the_robots_txt_url():
    refusal = robots(RFC_ROBOTS).refusal("http://h.test/no-ai/photo.jpg", AGENTS)
    assert refusal == f"{ROBOTS_DISALLOWED}: http://h.test/robots.txt rule 'Disallow: /no-ai/' for User-agent img2dataset"


def test_a_url_is_fetched_only_when_every_one_of_our_names_is_allowed():
    text = "User-agent: *\nAllow: /\n\nUser-agent: mybot\nDisallow: /private/\n"
    assert robots(text).refusal("http://h.test/private/a.jpg", agent_names(None)) is None
    assert robots(text).refusal("http://h.test/private/a.jpg", agent_names("mybot")).startswith(ROBOTS_DISALLOWED)


@pytest.mark.parametrize("status, error, allowed, unavailable", [
    (404, None, True, False), (410, None, True, False), (403, None, True, False),  # 4xx: no rules
    (500, None, False, True), (503, None, False, True), (429, None, False, True),  # 5xx and 429: the origin waits
    (None, "timed out", False, True),  # unreachable
])
def test_a_robots_txt_that_is_missing_errors_or_does_not_answer(status, error, allowed, unavailable):
    rules = RobotsFile.from_answer("http://h.test/robots.txt", status, b"", error)
    refusal = rules.refusal("http://h.test/a.jpg", AGENTS)
    assert (refusal is None) is allowed
    if unavailable:
        assert refusal.startswith(ROBOTS_UNAVAILABLE) and "--retry-failed" in refusal and "http://h.test/robots.txt" in refusal


def test_robots_url_is_per_origin_without_credentials():
    assert robots_url("https://user:pw@Example.com:8443/a/b.jpg?x=1") == "https://example.com:8443/robots.txt"


def test_the_robots_cache_loads_once_per_origin_and_forgets_the_least_recently_used():
    loads = []

    def load(url):
        loads.append(url)
        return RobotsFile.from_answer(url, 404)

    cache = RobotsCache(size=2)
    for url in ("http://a.test/1", "http://a.test/2", "http://b.test/1", "http://c.test/1", "http://a.test/3"):
        cache.get(url, load)
    assert loads == ["http://a.test/robots.txt", "http://b.test/robots.txt", "http://c.test/robots.txt", "http://a.test/robots.txt"]


def test_a_robots_load_that_raises_lets_the_next_caller_load_it():
    cache = RobotsCache()

    def broken(url):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get("http://a.test/x", broken)
    assert cache.get("http://a.test/x", lambda url: RobotsFile.from_answer(url, 404)).parser is None
