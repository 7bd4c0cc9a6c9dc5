"""dallekit download vs img2dataset's CLI on hosts that ask for manners: robots.txt, rate limits, Retry-After.

Serves N small generated shapes (64-128 px JPEGs) from 8 loopback hosts, 127.0.0.2-9 on one port
(`dallekit.demo.hosts.LoopbackHost`), the URLs dealt round-robin over them. Two hosts answer 429
above 5 requests/s (a token bucket of 5, as nginx's `limit_req rate=5r/s burst=5 nodelay`), one
without Retry-After and one with `Retry-After: 1`; one other host's robots.txt reads
"User-agent: *\\nDisallow: /private/" and half of its URLs are under /private/. Writes one URL
list, runs `dallekit ingest` once (not timed), then alternates img2dataset's CLI and
`dallekit download` in rounds (ABAB...) with the same processes, threads and shard size, each
otherwise with its defaults (dallekit: polite; img2dataset: --retries 0), the hosts' counters
fresh for every run. Prints per run and tool: successes among the allowed URLs (those not under
a disallowed path), the requests the hosts got for disallowed paths, the 429s they sent, and
wall seconds; then the lower bound the rate limits set on the wall time (the most over the
limited hosts of (allowed URLs on it - burst) / rate), dallekit's wall / bound (target <= 1.25)
and its requests to disallowed paths (target 0). Last line: ratio=<dallekit's successes /
allowed URLs> in its worst round. Target >= 0.99.

    python benchmarks/polite_download.py [--n 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from common import BIN, alternate, img2dataset_command, run_command

from dallekit.demo.hosts import HostRules, LoopbackHost
from dallekit.demo.synthetic import Route, encode, random_spec, render

ADDRESSES = [f"127.0.0.{i}" for i in range(2, 10)]
RATE, BURST = 5.0, 5  # the limited hosts' requests per second and bucket
DISALLOWED = "/private/"
RULES = [
    HostRules(rate_limit=RATE, burst=BURST),  # 429 with no Retry-After
    HostRules(rate_limit=RATE, burst=BURST, retry_after="1"),
    HostRules(robots_txt=f"User-agent: *\nDisallow: {DISALLOWED}\n"),
] + [HostRules() for _ in ADDRESSES[3:]]


@dataclass
class Site:
    """What the hosts serve (one dict of routes per address) and the URL list, as (host index, path) and caption."""

    routes: list[dict[str, Route]]
    paths: list[tuple[int, str]]
    captions: list[str]

    def allowed_on(self, host: int) -> int:
        """How many of the host's URLs robots.txt allows."""
        return sum(1 for k, path in self.paths if k == host and not path.startswith(DISALLOWED))


@dataclass
class Run:
    """One tool's run, counted from its output and from the hosts' side."""

    successes: int  # among the allowed URLs
    disallowed_requests: int
    throttled: int  # 429s the hosts sent
    seconds: float
    failures: collections.Counter  # the allowed URLs' error messages (their first 72 characters)


def make_site(n: int, seed: int = 0) -> Site:
    """n small shapes dealt round-robin over the hosts; half of the robots host's URLs under /private/."""
    rng = random.Random(seed)
    site = Site([{} for _ in ADDRESSES], [], [])
    for i in range(n):
        host = i % len(ADDRESSES)
        spec = random_spec(rng, width=rng.randint(64, 128), height=rng.randint(64, 128))
        private = RULES[host].robots_txt is not None and (i // len(ADDRESSES)) % 2 == 0
        path = f"{DISALLOWED if private else '/img/'}{i:06d}.jpg"
        site.routes[host][path] = Route(encode(render(spec)), headers={"Content-Type": "image/jpeg"})
        site.paths.append((host, path))
        site.captions.append(spec.caption)
    return site


def allowed_outcomes(folder: Path, allowed: set[str]) -> tuple[int, collections.Counter]:
    """Rows with status success whose URL is an allowed one, and the other allowed rows' messages, in a folder of Parquet shards."""
    import pyarrow.parquet as pq

    files = [p for p in folder.glob("*.parquet") if not p.name.startswith("_")]
    rows = pd.concat([pq.read_table(p, columns=["url", "status", "error_message"]).to_pandas() for p in files])
    rows = rows[rows["url"].isin(allowed)]
    failed = rows[rows["status"].ne("success")]["error_message"].fillna("").str.slice(0, 72)
    return int(rows["status"].eq("success").sum()), collections.Counter(failed)


def measure(cmd: list[str], out: Path, hosts: list[LoopbackHost], allowed: set[str]) -> Run:
    """Run cmd (which writes out, removed afterwards) against fresh counters and count what happened."""
    for host in hosts:
        host.reset_counters()
    seconds = run_command(cmd)
    disallowed = sum(count for host in hosts for path, count in list(host.by_path.items()) if path.startswith(DISALLOWED))
    successes, failures = allowed_outcomes(out, allowed)
    run = Run(successes, disallowed, sum(host.statuses[429] for host in hosts), seconds, failures)
    shutil.rmtree(out)
    return run


def rate_bound(site: Site) -> float:
    """Seconds the rate limits force at least: the most over the limited hosts of (allowed URLs on it - burst) / rate."""
    return max([0.0] + [max(0, site.allowed_on(k) - (rules.burst or BURST)) / rules.rate_limit
                        for k, rules in enumerate(RULES) if rules.rate_limit is not None])


def report(results: list[tuple[Run, Run]], allowed: int, bound: float) -> None:
    """One line per run, the bound, dallekit's targets and, last, ratio= (dallekit's worst round)."""
    print(f"{'round':<7}{'tool':<13}{'successes':>16}{'disallowed req':>16}{'429s sent':>11}{'wall s':>9}")
    for i, runs in enumerate(results, 1):
        for tool, run in zip(("img2dataset", "dallekit"), runs):
            print(f"{i:<7}{tool:<13}{f'{run.successes}/{allowed}':>16}{run.disallowed_requests:>16}{run.throttled:>11}{run.seconds:>9.1f}")
    ours = [b for _, b in results]
    for i, run in enumerate(ours, 1):
        print(f"dallekit round {i}: allowed URLs that failed: {dict(run.failures.most_common(3)) or 'none'}")
    print(f"rate-limit bound: {bound:.1f} s")
    print(f"dallekit wall / bound: {', '.join(f'{r.seconds / bound:.2f}' for r in ours)} (target <= 1.25)")
    print(f"dallekit requests to disallowed paths: {', '.join(str(r.disallowed_requests) for r in ours)} (target 0)")
    print(f"ratio={min(r.successes for r in ours) / allowed:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="URLs, dealt round-robin over the 8 hosts")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of img2dataset then dallekit")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    site = make_site(args.n)
    with contextlib.ExitStack() as stack:
        hosts: list[LoopbackHost] = []
        for address, routes, rules in zip(ADDRESSES, site.routes, RULES):  # one port for all, as the web's port 80
            port = hosts[0].port if hosts else 0
            hosts.append(stack.enter_context(LoopbackHost(address, routes, rules, port=port, max_seconds=3600)))
        url_list = [hosts[k].url(path) for k, path in site.paths]
        allowed = {url for url, (_, path) in zip(url_list, site.paths) if not path.startswith(DISALLOWED)}
        urls = work / "urls.parquet"
        pd.DataFrame({"url": url_list, "caption": site.captions}).to_parquet(urls)
        run_command([str(BIN / "dallekit"), "ingest", str(urls), "--out", str(work / "shards"), "--shard-size", str(args.shard_size),
                     "--workers", str(args.processes)])

        def img2dataset() -> Run:
            out = work / "i2d"
            return measure(img2dataset_command(urls, out, args.processes, args.threads, args.shard_size), out, hosts, allowed)

        def dallekit() -> Run:
            out = work / "dk"
            return measure([str(BIN / "dallekit"), "download", str(work / "shards"), "--out", str(out), "--workers", str(args.processes),
                            "--threads", str(args.threads)], out, hosts, allowed)

        results = alternate(args.rounds, img2dataset, dallekit)
    shutil.rmtree(work, ignore_errors=True)
    limited = sum(r.rate_limit is not None for r in RULES)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.n} URLs on {len(ADDRESSES)} loopback hosts ({limited} at "
          f"{RATE:g}/s, burst {BURST}; {args.n - len(allowed)} disallowed by robots.txt); {args.processes} processes x "
          f"{args.threads} threads, shards of {args.shard_size}")
    report(results, len(allowed), rate_bound(site))


if __name__ == "__main__":
    main()
