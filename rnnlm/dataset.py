"""The training data of a job: the corpus fetched, prepared once (token ids in the cache,
memory-mapped), and cut into a training slice and a held-out slice. Both slices are views of
the mapped ids: nothing here grows with the corpus."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from rnnlm import corpus, prepared
from rnnlm.config import DataConfig
from rnnlm.errors import FlagError
from rnnlm.vocab import Vocab


@dataclass(frozen=True)
class Dataset:
    vocab: Vocab
    train_ids: Tensor  # (N,) token ids of the training slice (uint8, int16 or int32)
    val_ids: Tensor  # held-out ids right after it (empty: no validation)
    path: Path
    sha1: str
    num_tokens: int = 0  # of the whole corpus
    unmap_pages: Callable[[], None] = lambda: None  # see PreparedCorpus.unmap_pages


def cache_dir(config: DataConfig) -> Path:
    """``--cache-dir``, else $RNNLM_CACHE_DIR or ~/.cache/rnnlm."""
    return Path(config.cache_dir) if config.cache_dir else corpus.default_cache_dir()


def load_dataset(config: DataConfig, retry_for: float = 0.0) -> Dataset:
    """The vocabulary is built from the WHOLE corpus, then the training slice is cut (d2l).
    ``retry_for``: seconds an unreachable corpus host is retried (see :func:`corpus.fetch`)."""
    cache = cache_dir(config)
    path = corpus.fetch(config.corpus, config.resolved_sha1(), cache, config.max_corpus_mb << 20,
                        retry_for)  # fmt: skip
    sha1 = corpus.sha1_remembered(path, cache)
    ready = prepared.prepare(path, sha1, config.preprocess, config.min_freq, cache)
    vocab, ids = ready.vocab, ready.ids
    train_end = config.max_tokens if config.max_tokens > 0 else len(ids) - config.val_tokens
    train_ids, val_ids = ids[:train_end], ids[train_end : train_end + config.val_tokens]
    if config.val_tokens and len(val_ids) < config.batch_size + 1:
        raise FlagError(
            "--val-tokens",
            f"only {len(val_ids)} tokens follow the training slice, too few for one validation "
            f"token per row of the batch ({config.batch_size}); pass --val-tokens 0 or use less "
            "--max-tokens.",
        )
    return Dataset(vocab, train_ids, val_ids, path, sha1, len(ids), ready.unmap_pages)
