"""Datasets as in-memory NumPy arrays, and a deterministic batch iterator.

    arrays, info = data.load("mnist", "train", permuted=True)
    for batch in data.batches(arrays, 128, seed=0, epoch=3, shuffle=True, drop_remainder=True):
      ...  # batch: inputs, labels, mask, weight [b], example_id [b]

Every split is loaded once into NumPy arrays (all these datasets fit in host
memory) and cached in-process; `batches` orders an epoch from (seed, epoch)
alone, which makes exact resume and multi-host slicing trivial.

| name              | task           | inputs              | labels      | train / val / test   |
|-------------------|----------------|---------------------|-------------|----------------------|
| sequential_digits | classification | [N,8,8] / [N,64,1]  | [N] 10      | 1258 / 269 / 270     |
| sunspots          | regression     | [N,window,1]        | [N,1] float | 216-window / 47 / 46 |
| python_docs       | lm             | [N,T] tokens        | [N,T] vocab | (chars-1) // seq_len |
| adding            | regression     | [N,T,2]             | [N,1] float | 100k / 10k / 10k     |
| copy              | tagging        | [N,T+20] tokens, 10 | [N,T+20] 10 | 100k / 10k / 10k     |
| number_words      | seq2seq        | [N,6] digit tokens  | [N,10] 43   | 100k / 5k / 5k       |
| reversal          | seq2seq        | [N,40] tokens       | [N,41] 23   | 100k / 5k / 5k       |
| mnist             | classification | [N,784,1]           | [N] 10      | 55000 / 5000 / 10000 |
| imdb_reviews      | classification | [N,max_len] tokens  | [N] 2       | 22500 / 2500 / 25000 |
| tiny_shakespeare  | lm             | [N,T] tokens        | [N,T] vocab | (chars-1) // seq_len |

Expected accuracies from the literature are in each loader module's docstring
(`local`, `synthetic`, `public`).  The TFDS-backed modules are imported only
when one of their datasets is loaded, so synthetic data needs no TensorFlow.
"""
from __future__ import annotations

import copy as _copy
import dataclasses
import importlib
import inspect

import numpy as np

from gru_jax.data.base import SPLITS, DatasetInfo, cache, clear_caches, resolve_data_dir
from gru_jax.data.pipeline import (batches, epoch_order, num_batches, shard_bounds,
                                   sharded_batches)

# name -> (module, loader); loader(split, **options) -> (arrays, DatasetInfo).
_LOADERS = {
    "sequential_digits": ("gru_jax.data.local", "load_sequential_digits"),
    "sunspots": ("gru_jax.data.local", "load_sunspots"),
    "python_docs": ("gru_jax.data.local", "load_python_docs"),
    "adding": ("gru_jax.data.synthetic", "load_adding"),
    "copy": ("gru_jax.data.synthetic", "load_copy"),
    "number_words": ("gru_jax.data.synthetic", "load_number_words"),
    "reversal": ("gru_jax.data.synthetic", "load_reversal"),
    "mnist": ("gru_jax.data.public", "load_mnist"),
    "imdb_reviews": ("gru_jax.data.public", "load_imdb_reviews"),
    "tiny_shakespeare": ("gru_jax.data.public", "load_tiny_shakespeare"),
}
NAMES = tuple(_LOADERS)

__all__ = ["DatasetInfo", "load", "batches", "sharded_batches", "shard_bounds", "reads_shards",
           "num_batches", "epoch_order", "options",
           "sunspots_baselines", "python_docs_baselines", "clear_caches", "NAMES", "SPLITS"]


def _loader(name: str):
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}")
  module, fn = _LOADERS[name]
  return getattr(importlib.import_module(module), fn)


def options(name: str) -> dict:
  """The options `load(name, ...)` accepts, with their defaults."""
  params = inspect.signature(_loader(name)).parameters
  return {k: p.default for k, p in params.items() if k not in ("split", "shard")}


def reads_shards(name: str) -> bool:
  """Whether ``load(name, split, shard=...)`` reads only the shard's TFDS rows
  (else it builds the whole split and keeps the shard's rows)."""
  return "shard" in inspect.signature(_loader(name)).parameters


def load(name: str, split: str, *, shard: tuple[int, int] | None = None,
         **opts) -> tuple[dict[str, np.ndarray], DatasetInfo]:
  """Loads one split, or one shard of it, as NumPy arrays.

  ``shard=(i, S)`` returns the i-th of S near-equal contiguous shards, so the S
  shards partition the split.  Loaders backed by TFDS files (see `reads_shards`)
  read only rows `shard_bounds(N, i, S)` of TFDS's storage order, which need
  not be the order the whole split is returned in (sequential_digits sorts
  its rows back into scikit-learn's order, within the shard); the others
  (generated data, or a vocabulary built from the whole split) build the
  split and return its rows `shard_bounds(N, i, S)`.

  Returns:
    arrays: "inputs" [N,T,D] float32 or [N,T] int32; "labels" [N] int32
      (classification), [N,T] int32 (tagging, lm) or [N,K] float32 (regression);
      seq2seq sets add "decoder_inputs" [N,L] int32 and "label_mask" [N,L] bool;
      "mask" [N,T] bool, True on valid steps.  The arrays are shared with an
      in-process cache and are read-only: copy before modifying.
    info: the `DatasetInfo` (a fresh copy per call).

  Raises:
    ValueError: unknown name, split or option (the message lists the valid
      ones), or a bad option value.
  """
  valid = options(name)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} for dataset {name!r}; valid splits: "
                     f"{', '.join(SPLITS)}")
  unknown = sorted(set(opts) - set(valid))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; valid options: "
                     f"{', '.join(f'{k}={v!r}' for k, v in valid.items())}")
  # Defaults filled in and data_dir resolved, so equal requests share one cache entry.
  resolved = {**valid, **opts, "data_dir": resolve_data_dir(opts.get("data_dir"))}
  key = tuple(sorted(resolved.items()))
  try:
    hash(key)
  except TypeError:
    raise ValueError(f"options must be plain values (str, int, bool), got {opts}") from None
  if shard is not None:
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
        or not all(isinstance(v, (int, np.integer)) for v in shard)):
      raise ValueError(f"shard must be (index, count), got {shard!r}")
    shard = (int(shard[0]), int(shard[1]))
    shard_bounds(1, *shard)  # validates index and count
  arrays, info = _load_cached(name, split, key, shard)
  extras = _copy.deepcopy(info.extras)
  if shard is not None:
    extras["shard"] = list(shard)
  return dict(arrays), dataclasses.replace(info, num_examples=dict(info.num_examples),
                                           extras=extras)


@cache(maxsize=8)
def _load_cached(name: str, split: str, key: tuple, shard: tuple[int, int] | None = None):
  if shard is not None and not reads_shards(name):
    arrays, info = _load_cached(name, split, key)
    lo, hi = shard_bounds(len(next(iter(arrays.values()))), *shard)
    return {k: v[lo:hi] for k, v in arrays.items()}, info
  kw = dict(key) if shard is None else dict(key, shard=shard)
  arrays, info = _loader(name)(split, **kw)
  for v in arrays.values():
    v.setflags(write=False)
  return arrays, info


def __getattr__(attr: str):
  # The baselines live with the TFDS builders; import them only when asked.
  if attr in ("sunspots_baselines", "python_docs_baselines"):
    from gru_jax.data import local
    return getattr(local, attr)
  raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
