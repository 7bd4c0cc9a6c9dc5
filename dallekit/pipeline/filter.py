"""filter: cleaned shards -> rows that pass every rule, each rule's score kept as a column.

Rules run in `RULES` order and a rejected row's `reason` is the first rule it failed. Image and
caption rules are cheap and run on every row; CLIP runs only on rows that passed them (its
`clip_score` is null for the others), and only after their headers: an image of more than
64 Mpx is rejected as `image_too_large` without being decoded. With `--clip-top-fraction` the CLIP threshold is global:
a first pass scores every shard and stores the scores in `_work/`, tasks sum a fine histogram
of them from which the driver takes the quantile (within `SCORE_BIN_WIDTH`), and the second
pass applies it without scoring again.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.config import FilterConfig, output_options
from dallekit.errors import BadInputError
from dallekit.images import ImageTooLarge, UndecodableImage, check_decode_size, decode_rgb
from dallekit.io import read_shard, shard_stem, write_table_atomic
from dallekit.pipeline.passes import map_with_progress, run_pass, work_dir
from dallekit.pipeline.shards import ShardResult, path_digest
from dallekit.pipeline.stage import Plan, Stage, run_plan, shard_tasks
from dallekit.tokenize.text import default_text_tokenizer


@dataclass(frozen=True)
class Rule:
    """One filter rule: its reject reason, the scores it judges, and which rows fail it."""

    name: str  # the reject reason and the funnel's row
    scores: tuple[str, ...]  # the score columns it judges; the rule applies when every one is there
    fails: Callable[[dict[str, np.ndarray], FilterConfig], np.ndarray] | None  # None: judged where CLIP decodes (see score_shard)
    from_input: bool = False  # its scores are input columns (LAION's), not ones the filter adds


LANG_UNKNOWN = "unknown"  # the `lang` of a caption with too few letters to identify (its lang_score is null)


def guessed_off_language(s: dict[str, np.ndarray], c: FilterConfig) -> np.ndarray:
    """Rows whose caption was identified as a language not in --languages, however sure the guess."""
    languages = {code.lower() for code in c.languages}
    if "any" in languages:
        return np.zeros(len(s["lang"]), bool)
    return np.array([lang != LANG_UNKNOWN and lang not in languages for lang in s["lang"]], bool)


def _off_language(s: dict[str, np.ndarray], c: FilterConfig) -> np.ndarray:
    # only a sure guess rejects: on short captions py3langid's guesses are mostly wrong and unsure
    # (English emoji names come out as pcm, st or la at 0.05-0.4), so an unsure one keeps the row
    return guessed_off_language(s, c) & (np.nan_to_num(s["lang_score"], nan=-np.inf) >= c.min_lang_score)


# The rules in order: a rejected row's reason is the first it fails. Limits are "not within", so
# that a missing size (NaN) fails too, and so does a row without image bytes; a missing LAION
# score passes.
FILTER_RULES = [
    Rule("min_side", ("min_side",), lambda s, c: ~(s["min_side"] >= c.min_side) | s["no_image"]),
    Rule("aspect", ("aspect",), lambda s, c: ~(s["aspect"] <= c.max_aspect)),
    Rule("caption_words", ("caption_words",), lambda s, c: s["caption_words"] < c.min_caption_words),
    Rule("caption_chars", ("caption_chars",), lambda s, c: s["caption_chars"] < c.min_caption_chars),
    Rule("caption_tokens", ("caption_tokens",), lambda s, c: s["caption_tokens"] > c.max_caption_tokens),
    Rule("lang", ("lang", "lang_score"), _off_language),
    Rule("punsafe", ("punsafe",), lambda s, c: np.nan_to_num(s["punsafe"], nan=-np.inf) > c.max_punsafe, from_input=True),
    Rule("pwatermark", ("pwatermark",), lambda s, c: np.nan_to_num(s["pwatermark"], nan=-np.inf) > c.max_pwatermark, from_input=True),
    Rule("image_too_large", (), None),  # with CLIP only, the one rule that decodes: the header is read first
    Rule("undecodable", (), None),  # with CLIP only: no readable header, or bytes CLIP's decode refused
    Rule("clip_score", ("clip_score",), None),
    Rule("semantic_duplicate", (), None),  # last: only rows every other rule keeps take part (see pipeline/semdedup/)
]
RULES = [r.name for r in FILTER_RULES]
SCORE_COLUMNS = [name for r in FILTER_RULES if r.fails is not None and not r.from_input for name in r.scores]  # added by every filter


@functools.lru_cache(maxsize=1)
def _language_identifier():
    """py3langid's bundled model (numpy arrays, no pickle), loaded once per process."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str, min_letters: int = 0) -> tuple[str, float]:
    """(language code, probability) of a caption; (LANG_UNKNOWN, nan) when it has fewer than `min_letters` letters."""
    if sum(ch.isalpha() for ch in text) < min_letters:
        return LANG_UNKNOWN, math.nan
    lang, score = _language_identifier().classify(text)
    return lang, float(score)


def caption_scores(captions: list[str], min_lang_letters: int = 0) -> dict[str, list]:
    """Word, character and BPE-token counts, language and its probability, per caption."""
    tokenizer = default_text_tokenizer()
    langs = [identify_language(c, min_lang_letters) for c in captions]
    return {
        "caption_words": [len(c.split()) for c in captions],
        "caption_chars": [len(c) for c in captions],
        "caption_tokens": [tokenizer.count(c) for c in captions],
        "lang": [lang for lang, _ in langs],
        "lang_score": [score for _, score in langs],
    }


def rule_failures(table: pa.Table, scores: dict[str, np.ndarray], config: FilterConfig) -> dict[str, np.ndarray]:
    """Boolean 'fails' arrays per non-CLIP rule that applies, in RULES order."""
    scores = scores | {"no_image": pc.fill_null(pc.binary_length(table.column("jpg")), 0).to_numpy(zero_copy_only=False) == 0}
    for rule in FILTER_RULES:
        if rule.from_input and all(n in table.column_names for n in rule.scores):
            scores |= {n: table.column(n).cast(pa.float64()).to_numpy(zero_copy_only=False) for n in rule.scores}
    return {r.name: r.fails(scores, config) for r in FILTER_RULES if r.fails is not None and all(n in scores for n in r.scores)}


def first_failure(fails: dict[str, np.ndarray], n: int) -> list[str | None]:
    """The first failing rule per row, in RULES order, or None."""
    reasons: list[str | None] = [None] * n
    for rule in RULES:
        if rule not in fails:
            continue
        for i in np.flatnonzero(fails[rule]):
            if reasons[i] is None:
                reasons[i] = rule
    return reasons


@dataclass
class FilterShard:
    """One filter task: the cleaned shard, the options, and CLIP scores from a first pass if any."""

    path: str
    config: FilterConfig
    work_dir: str
    scores_ready: bool = False  # True: read clip_score from _work/ instead of running CLIP
    semantic: bool = False  # True: the semantic dedup's result for this shard is in _work/ (see semantic_columns)


def score_shard(task: FilterShard) -> tuple[pa.Table, dict[str, np.ndarray], list[str | None]]:
    """The shard, its score columns, and each row's first failing non-CLIP rule."""
    table = read_shard(task.path)
    width = table.column("original_width").cast(pa.float64()).to_numpy(zero_copy_only=False)
    height = table.column("original_height").cast(pa.float64()).to_numpy(zero_copy_only=False)
    captions = [c or "" for c in table.column("caption").to_pylist()]
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN-propagating: a row with a missing side has no size
        scores = {"min_side": np.minimum(width, height), "aspect": np.maximum(width, height) / np.minimum(width, height)}
    scores |= {k: np.array(v) for k, v in caption_scores(captions, task.config.min_lang_letters).items()}
    reasons = first_failure(rule_failures(table, scores, task.config), table.num_rows)
    if task.config.clip:  # CLIP will decode the rows still in: none over MAX_DECODE_PIXELS by its header
        images = table.column("jpg")
        for i in [i for i, reason in enumerate(reasons) if reason is None]:
            reasons[i] = header_reason(images[i].as_py())
    return table, scores, reasons


def header_reason(data: bytes) -> str | None:
    """`image_too_large` over MAX_DECODE_PIXELS by the header (PIL's bomb refusal included), `undecodable` with no readable header."""
    try:
        check_decode_size(data)
    except ImageTooLarge:
        return "image_too_large"
    except UndecodableImage:
        return "undecodable"
    return None


def clip_scores(table: pa.Table, rows: list[int], config: FilterConfig) -> np.ndarray:
    """CLIP cosine similarity of the given rows' image and caption, in batches; NaN for an image that does not decode."""
    from dallekit.models.clip import cached_clip

    scorer = cached_clip(config.clip_model, config.clip_pretrained, config.clip_checkpoint, config.device)
    images, captions = table.column("jpg"), table.column("caption")
    out = np.full(len(rows), np.nan, dtype=np.float32)
    for start in range(0, len(rows), config.clip_batch_size):
        pictures, scored = [], []
        for j in range(start, min(start + config.clip_batch_size, len(rows))):
            try:
                pictures.append(decode_rgb(images[rows[j]].as_py(), draft_size=scorer_input_size(scorer)))
                scored.append(j)
            except UndecodableImage:  # a truncated body behind a good header: the row is rejected as undecodable
                continue
        if scored:
            out[scored] = scorer.score(pictures, [captions[rows[j]].as_py() for j in scored])
    return out


def embedding_scores(task: FilterShard, table: pa.Table, rows: list[int]) -> np.ndarray:
    """CLIP scores of the given rows read from --embeddings (its shard of the same name): image . text; NaN where embed could not embed the image.

    Every row of the shard must be in the embeddings shard or in its rejects, and nothing else
    may be there: embeddings of other rows are bad input, naming the shard.
    """
    from dallekit.pipeline.embeddings import IMAGE_COLUMN, TEXT_COLUMN, check_table, clip_score, embedding_matrix

    folder = task.config.embeddings.rstrip("/")
    path = f"{folder}/{shard_stem(task.path)}.parquet"
    embedded = check_table(path, read_shard(path, ["uid", IMAGE_COLUMN, TEXT_COLUMN]))
    rejected = _embedding_rejects(f"{folder}/_rejects/{shard_stem(task.path)}.parquet")
    uids = table.column("uid").to_pylist()
    position = {uid: k for k, uid in enumerate(embedded.column("uid").to_pylist())}
    if set(position) | rejected != set(uids):
        stray = sorted((set(position) | rejected) ^ set(uids), key=str)[0]  # key: a hand-edited rejects file may hold a null uid
        raise BadInputError(f"--embeddings {path}: its uids are not the rows of {task.path} (uid {stray} is in one, not the other); "
                            "embed this input again")
    picked = [position.get(uids[i], -1) for i in rows]
    scores = clip_score(embedding_matrix(embedded.column(IMAGE_COLUMN)), embedding_matrix(embedded.column(TEXT_COLUMN)))
    out = np.full(len(rows), np.nan, dtype=np.float32)
    found = np.array([k >= 0 for k in picked], bool)
    out[found] = scores[np.array(picked, np.int64)[found]]
    return out


def _embedding_rejects(path: str) -> set[str]:
    """The uids embed rejected from one shard (none when it wrote no rejects file)."""
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return set()
    return set(read_shard(path, ["uid"]).column("uid").to_pylist())


def row_clip_scores(task: FilterShard, table: pa.Table, rows: list[int]) -> np.ndarray:
    """The CLIP scores of the given rows: from --embeddings when given, else by running CLIP on their images."""
    return embedding_scores(task, table, rows) if task.config.embeddings else clip_scores(table, rows, task.config)


def scorer_input_size(scorer) -> int:
    """The side CLIP's preprocessing resizes to; JPEGs need not decode larger than twice that."""
    size = getattr(scorer.model.visual, "image_size", 224)
    return 2 * (size[0] if isinstance(size, (tuple, list)) else size)


def _scores_path(task: FilterShard) -> str:
    name = task.path.rstrip("/").rsplit("/", 1)[-1]
    return f"{task.work_dir}/clip/{name}"


def clip_pass(task: FilterShard) -> int:
    """First pass of --clip-top-fraction: score the rows that pass the other rules, save the scores."""
    table, _, reasons = score_shard(task)
    rows = [i for i, r in enumerate(reasons) if r is None]
    scores = row_clip_scores(task, table, rows) if rows else np.zeros(0, np.float32)
    uids = table.column("uid").take(rows) if rows else pa.array([], pa.string())
    write_table_atomic(pa.table({"uid": uids, "clip_score": pa.array(scores, pa.float32())}), _scores_path(task))
    return len(rows)


def _clip_task(task: FilterShard) -> dict:
    """clip_pass as a task of the engine's `clip` pass: its score file is vouched for by the task's mark."""
    return {"scored": clip_pass(task)}


def filter_shard(task: FilterShard) -> ShardResult:
    """Score one shard, apply every rule, and split kept rows from rejects."""
    table, scores, reasons = score_shard(task)
    config = task.config
    for name in SCORE_COLUMNS:
        table = table.append_column(name, pa.array(scores[name]))
    if config.clip:
        rows = [i for i, r in enumerate(reasons) if r is None]
        clip = np.full(table.num_rows, np.nan, dtype=np.float32)
        if task.scores_ready:
            fs, path = fsspec.core.url_to_fs(_scores_path(task))
            with fs.open(path, "rb") as f:
                saved = pq.read_table(f)
            by_uid = dict(zip(saved.column("uid").to_pylist(), saved.column("clip_score").to_pylist()))
            uids = table.column("uid").to_pylist()
            clip[rows] = [by_uid[uids[i]] for i in rows]
        elif rows:
            clip[rows] = row_clip_scores(task, table, rows)
        for i in rows:
            if np.isnan(clip[i]):
                reasons[i] = "undecodable"
            elif clip[i] < config.clip_threshold:
                reasons[i] = "clip_score"
        table = table.append_column("clip_score", pa.array(clip, pa.float32(), mask=np.isnan(clip)))
    table, reject_columns = semantic_columns(table, reasons, task) if task.semantic else (table, {})
    reason_col = pa.array(reasons, pa.string())
    rejected = pc.is_valid(reason_col)
    rejects = table.append_column("reason", reason_col)
    for name, column in reject_columns.items():
        rejects = rejects.append_column(name, column)
    return ShardResult(
        rows_in=table.num_rows,
        kept=table.filter(pc.invert(rejected)),
        rejects=rejects.filter(rejected),
        counters=language_counters(scores, reasons, config),
    )


def semantic_columns(table: pa.Table, reasons: list[str | None], task: FilterShard) -> tuple[pa.Table, dict[str, pa.Array]]:
    """The semantic dedup's columns: semantic_cluster and centroid_similarity on every row (null where it took no part), and
    duplicate_of and semantic_similarity for the rejects; a duplicate's reason becomes semantic_duplicate (it passed every other rule)."""
    from dallekit.pipeline.semdedup import semantic_path

    found = read_shard(semantic_path(task.work_dir, shard_stem(task.path)))
    at = pc.index_in(table.column("uid"), found.column("uid"))
    index, missing = pc.fill_null(at, 0), pc.is_null(at)

    def column(name: str) -> pa.Array:
        values = found.column(name).take(index) if found.num_rows else pa.nulls(table.num_rows, found.schema.field(name).type)
        return pc.if_else(missing, pa.nulls(table.num_rows, values.type), values)

    duplicate_of = column("duplicate_of")
    for i in np.flatnonzero(pc.is_valid(duplicate_of).to_numpy(zero_copy_only=False)):
        reasons[i] = "semantic_duplicate"  # only rows with no other reason took part
    table = table.append_column("semantic_cluster", column("semantic_cluster")).append_column("centroid_similarity", column("centroid_similarity"))
    return table, {"duplicate_of": duplicate_of, "semantic_similarity": column("semantic_similarity")}


def language_counters(scores: dict[str, np.ndarray], reasons: list[str | None], config: FilterConfig) -> dict[str, dict[str, int]]:
    """What the language rule let through unjudged, and the languages it rejected.

    `lang_kept`: rows that reached the rule (passed the rules before it) whose caption was too
    short to identify (`unknown`) or identified as another language with a probability below
    --min-lang-score (`uncertain`); `lang_rejected`: the guessed language of each row it rejected.
    """
    reached = np.array([r is None or RULES.index(r) >= RULES.index("lang") for r in reasons], bool)
    unsure = guessed_off_language(scores, config) & ~(np.nan_to_num(scores["lang_score"], nan=-np.inf) >= config.min_lang_score)
    guesses = collections.Counter(str(scores["lang"][i]) for i, r in enumerate(reasons) if r == "lang")
    unknown = np.array([lang == LANG_UNKNOWN for lang in scores["lang"]], bool)
    kept = {"unknown": int((reached & unknown).sum()), "uncertain": int((reached & unsure).sum())}
    return {"lang_kept": kept, "lang_rejected": dict(guesses)}


STAGE = Stage("filter", ("clean",), frozenset({"uid", "caption", "original_width", "original_height", "jpg"}),
              "shards from `dallekit clean`", filter_shard, rules=tuple(RULES))


def _weights_id(config: FilterConfig) -> str | None:
    """The CLIP checkpoint by content, so that retraining it into the same folder changes the fingerprint."""
    return path_digest(config.clip_checkpoint) if config.clip and config.clip_checkpoint else None


def _check_embeddings(input_dir: str, identity: dict, config: FilterConfig) -> dict | None:
    """The --embeddings folder's identity, checked: a finished embed of this input, by this run's CLIP; None without it."""
    if not config.embeddings:
        return None
    if not config.clip and config.semantic_dedup_eps is None:
        raise BadInputError(f"--embeddings {config.embeddings}: given with --no-clip and no --semantic-dedup-eps; "
                            "the embeddings are read only for the CLIP score and the semantic dedup")
    from dallekit.pipeline.embeddings import check_embedded_input, check_model, model_identity

    embedded = check_embedded_input(config.embeddings, input_dir, identity)
    if config.clip:  # with --no-clip only the semantic dedup reads them, and it compares them among themselves: any CLIP's serve
        check_model(config.embeddings, model_identity(config.clip_model, config.clip_pretrained, config.clip_checkpoint), "--embeddings")
    return embedded


def plan_filter(input_dir: str, config: FilterConfig) -> Plan:
    """The cleaned shards to filter; checks the input, its columns and that CLIP loads, before any task runs.

    With --clip-top-fraction the plan has a global pass: score every shard (resumable per
    shard), then the global threshold, which the shard tasks apply to the saved scores. With
    --semantic-dedup-eps the global pass then runs the semantic dedup (`semantic_pass`).
    """
    if config.semantic_dedup_eps is not None and not config.embeddings:  # at the option, before the input is read
        raise BadInputError(f"--semantic-dedup-eps {config.semantic_dedup_eps}: expected --embeddings DIR as well: "
                            "the semantic dedup compares the image embeddings `dallekit embed` wrote")
    identity, paths, _ = STAGE.input_of(input_dir)
    embedded = _check_embeddings(input_dir, identity, config)
    if config.clip and not config.embeddings:
        from dallekit.models.clip import cached_clip

        cached_clip(config.clip_model, config.clip_pretrained, config.clip_checkpoint, config.device)  # fail fast, here

    def clip_pass(client, output_dir: str) -> float:
        tasks = [FilterShard(p, config, work_dir(output_dir)) for p in paths]
        # a rerun skips the shards whose score files its marks vouch for (scored by an earlier, interrupted run)
        run_pass(client, work_dir(output_dir), "clip", _clip_task, {shard_stem(t.path): t for t in tasks}, desc="filter clip", unit="shard")
        threshold = global_threshold(client, [_scores_path(t) for t in tasks], config.clip_top_fraction)
        print(f"filter: the top {config.clip_top_fraction:.0%} of CLIP scores start at {threshold:.4f}")
        return threshold

    def global_pass(client, output_dir: str) -> float | dict | None:
        threshold = clip_pass(client, output_dir) if top_fraction else None
        if config.semantic_dedup_eps is None:
            return threshold
        return {"clip_threshold": threshold, "semantic": semantic_pass(client, config, paths, output_dir, threshold)}

    def tasks(prepared: float | dict | None, output_dir: str) -> list:
        semantic = isinstance(prepared, dict)
        threshold = prepared["clip_threshold"] if semantic else prepared
        chosen = config if threshold is None else replace(config, clip_threshold=threshold)
        return shard_tasks(paths, lambda p: FilterShard(p, chosen, work_dir(output_dir), scores_ready=threshold is not None, semantic=semantic))

    top_fraction = config.clip and config.clip_top_fraction is not None
    return Plan(inputs=[input_dir], stats_config=asdict(config) | {"input": input_dir}, tasks=tasks,
                fingerprint={"input": identity, "options": output_options(config) | {"clip_checkpoint": _weights_id(config)}}
                | ({"embeddings": embedded} if embedded else {}),
                global_pass=global_pass if top_fraction or config.semantic_dedup_eps is not None else None)


@dataclass(frozen=True)
class SemanticEligibility:
    """Which rows of a shard take part in the semantic dedup: those every other rule keeps (the filter's own shard task, run without it)."""

    config: FilterConfig  # with the global CLIP threshold, when there is one
    work_dir: str
    paths: dict[str, str]  # shard name -> cleaned shard
    scores_ready: bool

    def __call__(self, name: str, uids: pa.ChunkedArray) -> np.ndarray:
        kept = filter_shard(FilterShard(self.paths[name], self.config, self.work_dir, self.scores_ready)).kept
        return pc.is_in(uids, value_set=kept.column("uid").combine_chunks()).to_numpy(zero_copy_only=False)


def semantic_pass(client, config: FilterConfig, paths: list[str], output_dir: str, threshold: float | None) -> dict:
    """The semantic dedup over the --embeddings shards of the input, among the rows every other rule keeps; its counts.

    Its result is in the stage's scratch folder, one file per shard, which the shard tasks read
    (`semantic_columns`); it is a chain of resumable passes (`pipeline/semdedup/`).
    """
    from dallekit.pipeline.semdedup import SemanticParams, semantic_dedup

    chosen = config if threshold is None else replace(config, clip_threshold=threshold)
    scratch, names = work_dir(output_dir), [shard_stem(p) for p in paths]
    eligible = SemanticEligibility(chosen, scratch, dict(zip(names, paths)), scores_ready=threshold is not None)
    params = SemanticParams(eps=config.semantic_dedup_eps, clusters=config.semantic_dedup_clusters, keep=config.semantic_dedup_keep,
                            sample=config.semantic_dedup_sample, eligible_id=output_options(chosen))
    shards = [(name, f"{config.embeddings.rstrip('/')}/{name}.parquet") for name in names]
    stats = semantic_dedup(client, shards, scratch, params, eligible)
    print(f"filter: semantic dedup: {stats['duplicates']} of {stats['rows']} eligible rows are duplicates "
          f"({stats['clusters']} clusters, the largest {stats['largest_cluster']} rows)")
    return {k: stats[k] for k in ("rows", "clusters", "duplicates", "largest_cluster", "pairs_tasks")}


def filter(input_dir: str, output_dir: str, config: FilterConfig, client, plan: Plan | None = None) -> dict:
    """Run the filter stage; prints and saves the funnel (`_funnel.json`, `_funnel.png`)."""
    return run_plan(STAGE, plan or plan_filter(input_dir, config), output_dir, client, config.overwrite)


# The global CLIP threshold comes from a histogram of the scores (cosines, in [-1, 1]) summed
# over the shards, so that no task and not the driver holds every score. It is the lower edge of
# the bin that holds the exact quantile: at most one bin width below it, never above, so at least
# the asked fraction is kept, plus the rows of that one bin that lie below the exact quantile.
SCORE_BINS = 1 << 16
SCORE_BIN_WIDTH = 2 / SCORE_BINS  # 3.05e-5: the threshold's largest error
MAX_HISTOGRAM_TASKS = 64  # the driver sums at most this many histograms of SCORE_BINS counts


def score_histogram(score_paths: list[str]) -> np.ndarray:
    """Counts of the CLIP scores saved in these files over SCORE_BINS equal bins of [-1, 1], one file at a time."""
    counts = np.zeros(SCORE_BINS, np.int64)
    for path in score_paths:
        fs, p = fsspec.core.url_to_fs(path)
        with fs.open(p, "rb") as f:
            scores = pq.read_table(f, columns=["clip_score"]).column("clip_score").to_numpy().astype(np.float64)
        scores = scores[~np.isnan(scores)]  # undecodable images have no score
        # (s + 1) / 2^-15 is exact for float32 scores, so a score's bin never rounds across an edge
        bins = np.clip(np.floor((scores + 1) / SCORE_BIN_WIDTH), 0, SCORE_BINS - 1).astype(np.int64)
        counts += np.bincount(bins, minlength=SCORE_BINS)
    return counts


def threshold_from_histogram(counts: np.ndarray, fraction: float) -> float:
    """The lower edge of the bin holding np.quantile(scores, 1 - fraction, method="higher"); inf when nothing was scored."""
    total = int(counts.sum())
    if total == 0:
        return float("inf")
    rank = math.ceil((total - 1) * (1 - fraction))  # the sorted position np.quantile's "higher" method takes
    b = int(np.searchsorted(np.cumsum(counts), rank, side="right"))
    return -1 + b * SCORE_BIN_WIDTH


def global_threshold(client, score_paths: list[str], fraction: float) -> float:
    """The CLIP score from which about `fraction` of all scored rows lie (within SCORE_BIN_WIDTH below the exact quantile)."""
    per_task = max(1, math.ceil(len(score_paths) / MAX_HISTOGRAM_TASKS))
    groups = [score_paths[i : i + per_task] for i in range(0, len(score_paths), per_task)]
    counts = np.zeros(SCORE_BINS, np.int64)
    for part in map_with_progress(client, score_histogram, groups, desc="filter threshold", unit="task"):
        counts += part
    return threshold_from_histogram(counts, fraction)
