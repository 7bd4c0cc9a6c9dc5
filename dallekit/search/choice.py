"""Which faiss index fits a memory budget, after autofaiss's index selection (criteo/autofaiss, external/optimize.py).

autofaiss's rules, kept here: an HNSW graph when one with M >= 8 links per vector fits the
budget (4 bytes per float of every vector, plus M * 2 links of 4 bytes; M at most 32), else an
inverted file over product-quantized codes (IVF-PQ) with the largest code that fits
(`pq + 8` bytes per vector, the 8 being the id its inverted list keeps, plus the centroids),
and ~4 * sqrt(n) lists as a power of two below a million vectors. Ours differ in three ways,
each for a reason: the exact index is kept up to FLAT_MAX_ROWS vectors, not 1,000 (one query
over 100,000 x 512 floats takes a few milliseconds, and exact is what a user expects from a
small search); the number of lists is never more than the training sample can fill with 39
points each (faiss's floor), so small folders train a sane index; and no OPQ rotation
(its training dominates the build on a few cores and buys little with 4 or fewer dimensions a
sub-quantizer). The search parameters (nprobe, efSearch) are not chosen here: the build
measures recall on a sample of its own rows (see `build.tune`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dallekit.config import memory_bytes
from dallekit.errors import BadInputError

KINDS = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX_ROWS = 100_000  # auto: exact search up to here, when it fits the budget
HNSW_MIN_M, HNSW_MAX_M = 8, 32  # autofaiss: an HNSW with fewer than 8 links is not worth it; 32 is plenty
PQ_CODES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # bytes per vector, best first (autofaiss's list)
ID_BYTES = 8  # the id an inverted list keeps with each code
MIN_POINTS_PER_LIST = 39  # faiss's k-means warns below this many training points a centroid
TRAIN_POINTS_PER_LIST = 64  # how many the build samples for each list (autofaiss takes up to 100, memory allowing)
MAX_TRAIN_ROWS = 262_144  # the training sample's bound: k-means on more buys nothing measurable and costs minutes


def parse_memory(text: str | int, option: str = "--max-memory") -> int:
    """'4GB', '512MiB', '1.5GB' or a number of bytes, as bytes; bad input naming the option otherwise."""
    size = text if isinstance(text, int) and text > 0 else memory_bytes(str(text))
    if size is None:
        raise BadInputError(f"{option} {text}: expected a size such as 4GB, 512MB or 2GiB")
    return size


def memory_text(size: float) -> str:
    """Bytes as a short readable size: 1.2 GB, 340 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


@dataclass(frozen=True)
class IndexChoice:
    """One index to build: its kind, faiss factory string, parameters and estimated size in memory."""

    kind: str
    factory: str
    params: dict = field(default_factory=dict)
    estimated_bytes: int = 0

    @property
    def needs_training(self) -> bool:
        """Whether the index learns from a sample before vectors are added (IVF-PQ)."""
        return self.kind == "ivfpq"


def flat_choice(rows: int, dim: int) -> IndexChoice:
    """Exact inner-product search over float32 vectors."""
    return IndexChoice("flat", "Flat", {}, 4 * rows * dim)


def hnsw_links(rows: int, dim: int, budget: int) -> int:
    """autofaiss's HNSW M for a budget: floor((budget / (4 n) - d) / 2), the links that fit beside the float32 vectors."""
    return int(math.floor((budget / (4 * rows) - dim) / 2))


def hnsw_choice(rows: int, dim: int, links: int) -> IndexChoice:
    """An HNSW graph of `links` neighbours a vector (faiss's M), over float32 vectors."""
    return IndexChoice("hnsw", f"HNSW{links}", {"M": links, "efConstruction": 40}, rows * (4 * dim + 2 * 4 * links))


def list_count(rows: int) -> int:
    """autofaiss's inverted lists, ~4 sqrt(n) as a power of two, bounded by what the training sample fills with 39 points each."""
    wanted = 2 ** round(math.log2(4 * math.sqrt(rows)))
    fillable = max(1, min(rows, MAX_TRAIN_ROWS) // MIN_POINTS_PER_LIST)
    return int(max(1, min(wanted, 2 ** int(math.log2(fillable)))))


def code_bits(rows: int) -> int:
    """Bits of a sub-quantizer code: 8 (256 centroids), fewer when the sample cannot give each of them 39 points."""
    sample = min(rows, MAX_TRAIN_ROWS)
    return int(max(1, min(8, math.floor(math.log2(max(2, sample // MIN_POINTS_PER_LIST))))))


def ivfpq_size(rows: int, dim: int, lists: int, code_bytes: int, bits: int) -> int:
    """autofaiss's estimate: each vector's code and id, plus the centroids."""
    return rows * (math.ceil(code_bytes * bits / 8) + ID_BYTES) + lists * dim * 4


def ivfpq_choice(rows: int, dim: int, budget: int | None) -> IndexChoice | None:
    """The IVF-PQ with the largest code that fits the budget (any budget: the largest code), or None when none fits."""
    lists, bits = list_count(rows), code_bits(rows)
    for code in PQ_CODES:
        if code > dim // 2 or dim % code:  # a sub-quantizer covers at least 2 whole dimensions
            continue
        size = ivfpq_size(rows, dim, lists, code, bits)
        if budget is None or size <= budget:
            return IndexChoice("ivfpq", f"IVF{lists},PQ{code}x{bits}", {"nlist": lists, "m": code, "nbits": bits}, size)
    return None


def choose_index(rows: int, dim: int, budget: int, kind: str = "auto") -> IndexChoice:
    """The index `kind` names, or with "auto" the best one that fits `budget` bytes for `rows` vectors of `dim` floats."""
    if rows < 1:
        raise BadInputError("no vectors to index")
    links = hnsw_links(rows, dim, budget)
    if kind == "flat" or (kind == "auto" and (rows <= FLAT_MAX_ROWS or rows < 1000) and 4 * rows * dim <= budget):
        return flat_choice(rows, dim)
    if kind == "hnsw" or (kind == "auto" and links >= HNSW_MIN_M):
        return hnsw_choice(rows, dim, min(max(links, HNSW_MIN_M), HNSW_MAX_M))
    if kind not in ("auto", "ivfpq"):
        raise BadInputError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if rows < 2 * MIN_POINTS_PER_LIST and kind == "auto":  # the budget, not --kind, led here: name the budget
        raise BadInputError(f"--max-memory {memory_text(budget)}: too small for {rows} vectors of {dim} dimensions; "
                            f"exact search needs about {memory_text(flat_choice(rows, dim).estimated_bytes)}")
    if rows < 2 * MIN_POINTS_PER_LIST:
        raise BadInputError(f"--kind ivfpq: {rows} vectors are too few to train an IVF-PQ index (at least {2 * MIN_POINTS_PER_LIST}); use --kind flat")
    choice = ivfpq_choice(rows, dim, budget if kind == "auto" else None)
    if choice is None:
        smallest = ivfpq_size(rows, dim, list_count(rows), min(c for c in PQ_CODES if c <= dim // 2 and dim % c == 0), code_bits(rows))
        raise BadInputError(f"--max-memory {memory_text(budget)}: too small for {rows} vectors of {dim} dimensions; "
                            f"the smallest index dallekit builds (IVF-PQ) needs about {memory_text(smallest)}")
    return choice


def train_rows(choice: IndexChoice, rows: int) -> int:
    """How many vectors the index trains on: TRAIN_POINTS_PER_LIST per list, at least enough for the codes, at most MAX_TRAIN_ROWS."""
    if not choice.needs_training:
        return 0
    wanted = max(TRAIN_POINTS_PER_LIST * choice.params["nlist"], MIN_POINTS_PER_LIST * 2 ** choice.params["nbits"])
    return int(min(rows, MAX_TRAIN_ROWS, wanted))
