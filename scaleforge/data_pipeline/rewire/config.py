"""The REWIRE configuration: one frozen value, validated on construction, read from YAML.

Torch-free. `load_config` reads the file with `yaml.safe_load` and builds the parts with the
project's strict dict->dataclass conversion (unknown keys and wrong types are refused by name).
Checks that need the file system or the network (a model directory, an endpoint, the pool store)
run in `pipeline.validate`, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from scaleforge.errors import ConfigError

BACKENDS = ("local", "http")
SERVERS = ("vllm", "transformers", "openai")
PROMPTS = ("direct", "guided")
DIGEST_EXCLUDE = ("endpoint", "server", "timeout_s", "retries", "threads", "concurrency")


READERS = ("jsonl", "parquet", "warc", "hf_disk")


@dataclass(kw_only=True, frozen=True)
class TextSet:
    """A set of documents: a slice of a token store's split, text files, or files a datatrove reader reads.

    Exactly one of `store`, `path` and `reader` is given. From a store or text files, documents are
    taken at indices `start, start + stride, ...` (`count` of them, 0: all there are); from a reader,
    the first `limit` documents of its files in sorted path order (0: all). Each is cut to its first
    `max_chars` characters, back to the last whitespace (0: whole documents).
    """

    store: str = ""
    """A token store (a path, or `bundled`): its documents are decoded with its own tokenizer."""
    path: str = ""
    """Text files instead of a store: a .txt/.md file, a .jsonl file (`text` field) or a directory."""
    reader: str = ""
    """A datatrove reader over `paths`: `jsonl` (gzip too), `parquet`, `warc` (WARC/WET records) or
    `hf_disk` (a Hugging Face dataset saved with `save_to_disk`: its directory)."""
    paths: tuple[str, ...] = ()
    """reader: the files (or, for hf_disk, dataset directories) as glob patterns (`**` recurses)."""
    text_key: str = "text"
    """reader: the field (JSONL key, Parquet or Arrow column) that holds the text."""
    id_key: str = "id"
    """reader: the field that holds the document id, when present (else file path and index)."""
    limit: int = 0
    """reader: documents read at most (0: all)."""
    split: str = "train"
    """The store split to read (train or validation)."""
    start: int = 0
    """Index of the first document taken."""
    count: int = 0
    """Documents taken (0: every document from `start` on, at the stride)."""
    stride: int = 1
    """Step between the indices of taken documents."""
    max_chars: int = 0
    """Cut each document to at most this many characters, at a word boundary (0: no cut)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(self.paths))
        if sum(map(bool, (self.store, self.path, self.reader))) != 1:
            raise ConfigError("a text set names exactly one of `store`, `path` and `reader`")
        if self.reader and self.reader not in READERS:
            raise ConfigError(f"reader must be one of {', '.join(READERS)}, got {self.reader!r}")
        if self.reader and not self.paths:
            raise ConfigError(f"reader {self.reader} needs `paths`: a list of file globs")
        if self.paths and not self.reader:
            raise ConfigError("`paths` go with a `reader` (jsonl, parquet, warc, hf_disk)")
        if self.reader and not self.text_key:
            raise ConfigError("text_key is empty: name the field that holds the text")
        if self.split not in ("train", "validation"):
            raise ConfigError(f"split must be train or validation, got {self.split!r}")
        for name in ("start", "count", "max_chars", "limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stride < 1:
            raise ConfigError(f"stride must be >= 1, got {self.stride}")


@dataclass(kw_only=True, frozen=True)
class FastTextConfig:
    """Training settings of a fastText classifier (DCLM's quality classifier is a bigram model)."""

    epochs: int = 5
    """Passes over the training documents."""
    lr: float = 0.1
    """Learning rate."""
    word_ngrams: int = 2
    """Word n-gram length (DCLM: 2)."""
    dim: int = 100
    """Embedding dimension."""
    min_count: int = 1
    """Words seen fewer times are ignored."""
    bucket: int = 2_000_000
    """Hash buckets of the n-gram table (fastText's default; the model file holds bucket x dim
    floats, 800 MB at the defaults: shrink both for small sets)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "word_ngrams", "dim", "min_count", "bucket"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


@dataclass(kw_only=True, frozen=True)
class ClassifyConfig:
    """Stage 1: a quality classifier trained from named sets; scores every pool document."""

    positives: tuple[TextSet, ...] = ()
    """Documents of the quality wanted (DCLM: instruction data and top-voted explanations)."""
    negatives: tuple[TextSet, ...] = ()
    """Documents of ordinary quality (DCLM: random pool documents)."""
    fasttext: FastTextConfig = field(default_factory=FastTextConfig)
    """fastText training settings."""
    held_out: float = 0.2
    """Fraction of each set held out (seeded draw) for precision, recall and AUC in the report."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "positives", tuple(self.positives))
        object.__setattr__(self, "negatives", tuple(self.negatives))
        if not 0 <= self.held_out < 1:
            raise ConfigError(f"classify.held_out must be in [0, 1), got {self.held_out}")
        if not self.positives:
            raise ConfigError("classify.positives is empty: name at least one set of good documents")
        if not self.negatives:
            raise ConfigError("classify.negatives is empty: name at least one set of ordinary documents")


@dataclass(kw_only=True, frozen=True)
class RewriteConfig:
    """Stage 2: every pool document rewritten by an instruct model."""

    backend: str = "local"
    """`local` (transformers in this process) or `http` (an OpenAI-compatible server)."""
    model: str = "smollm2-135m-instruct"
    """local: a Hugging Face causal-LM directory, or `smollm2-135m-instruct` (the packaged model);
    http: the model name the server serves."""
    endpoint: str = ""
    """http: the server's base URL, e.g. http://127.0.0.1:8000/v1."""
    server: str = "vllm"
    """http: how the repetition penalty travels, which the OpenAI API lacks: `vllm` (also SGLang: a
    `repetition_penalty` request field), `transformers` (`transformers serve`: a `generation_config`
    JSON field) or `openai` (no penalty: repetition_penalty must be 1.0)."""
    prompt: str = "direct"
    """`direct` (reply with the rewrite only: for small models) or `guided` (reason as an expert,
    then the improved text between tags: for capable models)."""
    max_new_tokens: int = 256
    """Generated tokens at most per document."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding (reproducible, what resume checks rely on)."""
    top_p: float = 1.0
    """Nucleus sampling mass (the paper: 0.9 at temperature 1.0)."""
    repetition_penalty: float = 1.1
    """Penalty on repeated tokens (1.0: none); sent to servers that accept it (vLLM, SGLang)."""
    min_length_ratio: float = 0.5
    """A rewrite with fewer words than this fraction of its source's is dropped as too short."""
    batch_size: int = 4
    """Documents per generation batch (fixed by document index, so a resumed shard batches alike)."""
    shard_size: int = 64
    """Documents per pool shard file (OUT/classify/docs): the unit a rewrite task takes, so a
    document's batch never depends on the number of tasks."""
    timeout_s: float = 600.0
    """http: seconds before a request counts as failed."""
    retries: int = 3
    """http: retries of a failed request (exponential backoff); then its document is marked
    `request_failed` and the task goes on."""
    concurrency: int = 8
    """http: requests in flight at once per task (batches after the current one are sent while
    it completes; batches are still committed in order)."""
    seed: int = 0
    """Sampling seed (per batch: seed + first document index)."""
    threads: int = 0
    """local: torch CPU threads (0: torch's default)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"rewrite.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.server not in SERVERS:
            raise ConfigError(f"rewrite.server must be one of {', '.join(SERVERS)}, got {self.server!r}")
        if self.backend == "http" and self.server == "openai" and self.repetition_penalty != 1.0:
            raise ConfigError(
                "rewrite.repetition_penalty must be 1.0 with rewrite.server openai (the OpenAI API has "
                "no repetition penalty): set it to 1.0, or name the server (vllm, transformers)"
            )
        if self.prompt not in PROMPTS:
            raise ConfigError(f"rewrite.prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")
        if not self.model:
            raise ConfigError("rewrite.model is empty: name a model directory or smollm2-135m-instruct")
        if self.backend == "http" and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"rewrite.endpoint must be an http(s) URL for backend http, got {self.endpoint!r}"
            )
        for name in ("max_new_tokens", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rewrite.{name} must be >= 1, got {getattr(self, name)}")
        if self.shard_size % self.batch_size:
            raise ConfigError(
                f"rewrite.shard_size ({self.shard_size}) must be a multiple of rewrite.batch_size "
                f"({self.batch_size}), so batches never straddle shards"
            )
        if not 0 <= self.temperature <= 5:
            raise ConfigError(f"rewrite.temperature must be in [0, 5], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rewrite.top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"rewrite.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_length_ratio <= 10:
            raise ConfigError(f"rewrite.min_length_ratio must be in [0, 10], got {self.min_length_ratio}")
        if not self.timeout_s > 0:
            raise ConfigError(f"rewrite.timeout_s must be > 0, got {self.timeout_s}")
        if self.concurrency < 1:
            raise ConfigError(f"rewrite.concurrency must be >= 1 (requests in flight), got {self.concurrency}")
        if self.retries < 0 or self.seed < 0 or self.threads < 0:
            raise ConfigError("rewrite.retries, rewrite.seed and rewrite.threads must be >= 0")

    def sampling(self) -> dict:
        """The sampling parameters, as recorded with the output."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }


@dataclass(kw_only=True, frozen=True)
class FilterConfig:
    """Stage 3: drop degenerate rewrites, then keep the top fraction by a second classifier."""

    positives: tuple[TextSet, ...] = ()
    """Positives of the rewrite classifier (empty: classify.positives, as the paper)."""
    negatives: int = 0
    """Random surviving rewrites used as negatives (0: as many as there are positives)."""
    keep_fraction: float = 0.1
    """Fraction of the surviving rewrites kept, by score (the paper: top 10%)."""
    repetition: bool = True
    """Apply the Gopher repetition rules (datatrove's GopherRepetitionFilter, its defaults)."""
    fasttext: FastTextConfig = field(default_factory=FastTextConfig)
    """fastText training settings of the rewrite classifier."""
    held_out: float = 0.2
    """Fraction of the positives held out (seeded draw) for precision, recall and AUC."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "positives", tuple(self.positives))
        if not 0 <= self.held_out < 1:
            raise ConfigError(f"filter.held_out must be in [0, 1), got {self.held_out}")
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"filter.keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.negatives < 0:
            raise ConfigError(f"filter.negatives must be >= 0, got {self.negatives}")


@dataclass(kw_only=True, frozen=True)
class DedupConfig:
    """Near-duplicate removal over the mix candidates (datatrove's MinHash stages)."""

    enabled: bool = True
    """Run it (false: the candidates go to the mix as they are)."""
    threshold: float = 0.72
    """Jaccard similarity of word n-gram shingles at which a pair is caught with probability 1/2
    (sets the number of MinHash buckets; datatrove's default 14 buckets of 8 hashes: 0.72)."""
    n_grams: int = 5
    """Shingle length in words."""

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        if self.n_grams < 1:
            raise ConfigError(f"dedup.n_grams must be >= 1, got {self.n_grams}")


@dataclass(kw_only=True, frozen=True)
class MixConfig:
    """Stage 4: the raw top fraction and the kept rewrites, at a token ratio, into a new store."""

    raw_fraction: float = 0.1
    """Fraction of the pool kept raw, by the quality score (the paper: top 10%, DCLM-Baseline)."""
    raw_share: float = 0.5
    """Share of raw tokens in the mix (the paper: 0.5; 0.6 was best at 3B). The larger side is cut,
    lowest scores first, so that no document repeats."""
    validation_fraction: float = 0.01
    """Fraction of the mixed documents held out for validation (at least 4, as every store)."""
    tokenizer: str = ""
    """A token store (a path, or `bundled`) whose tokenizer writes the mix and counts tokens
    (empty: the pool's store; a pool read from files names one)."""

    def __post_init__(self) -> None:
        if not 0 < self.raw_fraction <= 1:
            raise ConfigError(f"mix.raw_fraction must be in (0, 1], got {self.raw_fraction}")
        if not 0 <= self.raw_share <= 1:
            raise ConfigError(f"mix.raw_share must be in [0, 1], got {self.raw_share}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"mix.validation_fraction must be in [0, 1), got {self.validation_fraction}")


@dataclass(kw_only=True, frozen=True)
class ExecutorConfig:
    """How datatrove runs the stages: tasks, local workers, and the Slurm job settings.

    Outside the config digest: the outputs do not depend on it (a document's batch is fixed by its
    pool position, and every output is ordered by pool position)."""

    tasks: int = 1
    """datatrove tasks of each parallel stage (scoring, rewriting); the others run as one task."""
    workers: int = 1
    """Local executor: tasks run at once in worker processes (1: in this process)."""
    partition: str = ""
    """Slurm executor: the partition (empty: the cluster's default)."""
    time: str = "01:00:00"
    """Slurm executor: the time limit of each job."""
    cpus_per_task: int = 1
    """Slurm executor: CPUs per task."""
    mem_per_cpu_gb: int = 2
    """Slurm executor: memory per CPU in GB."""
    gpus_per_task: int = 0
    """Slurm executor: GPUs per rewrite task (a local model on the node's GPU)."""

    def __post_init__(self) -> None:
        for name in ("tasks", "workers", "cpus_per_task", "mem_per_cpu_gb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"executor.{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_task < 0:
            raise ConfigError(f"executor.gpus_per_task must be >= 0, got {self.gpus_per_task}")


@dataclass(kw_only=True, frozen=True)
class RewireConfig:
    """REWIRE: classify a pool, rewrite it, filter the rewrites, mix them with the best raw text."""

    pool: TextSet
    """The documents to recycle: a slice of a token store (the mixed store uses its tokenizer), or
    files a datatrove reader reads (then mix.tokenizer names the tokenizer)."""
    classify: ClassifyConfig
    """Stage 1: the quality classifier."""
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    """Stage 2: the rewrites."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """Stage 3: the rewrite filter."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Near-duplicate removal before the mix."""
    mix: MixConfig = field(default_factory=MixConfig)
    """Stage 4: the mixed store."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """How datatrove runs the stages (outside the digest)."""
    seed: int = 0
    """Seed of the classifiers and of the random rewrite negatives."""

    def __post_init__(self) -> None:
        if not self.pool.store and not self.mix.tokenizer:
            raise ConfigError("mix.tokenizer is empty and the pool is not a token store: name the store "
                              "(a path, or bundled) whose tokenizer the mixed store uses")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict:
        """Plain nested dict (field order)."""
        from scaleforge.config import to_dict

        return _plain(to_dict(self))

    def digest(self) -> str:
        """sha256 of the canonical config minus how the rewrites are fetched (endpoint, timeout,
        retries, threads) and how the stages run (executor), which leave the data unchanged: an
        output directory belongs to one digest."""
        body = self.to_dict()
        body.pop("executor")
        for key in DIGEST_EXCLUDE:
            body["rewrite"].pop(key)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        from scaleforge.config import to_dict

        return _plain(to_dict(value))
    return value


def load_config(path: str | Path) -> RewireConfig:
    """Read and validate a REWIRE YAML file; errors name the file and the field."""
    from scaleforge.config import from_dict, load_yaml_file

    data = load_yaml_file(path)
    if not data:
        raise ConfigError(f"{path}: the REWIRE config is empty; see examples/rewire-tiny.yaml")
    try:
        if isinstance(data, dict):
            _check_text_sets(data)
        return from_dict(RewireConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _check_text_sets(data: dict) -> None:
    """Build each text set alone first, so that its error names where it is (`classify.negatives[1]`)."""
    from scaleforge.config import from_dict

    places = [("pool", data.get("pool"))]
    for stage, key in (("classify", "positives"), ("classify", "negatives"), ("filter", "positives")):
        part = data.get(stage)
        sets = part.get(key) if isinstance(part, dict) else None
        if isinstance(sets, list):
            places += [(f"{stage}.{key}[{i}]", v) for i, v in enumerate(sets)]
    for where, value in places:
        if isinstance(value, dict):
            try:
                from_dict(TextSet, value, where)
            except ConfigError as exc:
                msg = str(exc)
                raise ConfigError(msg if msg.startswith(where) or f"'{where}." in msg else f"{where}: {msg}") from None
