"""Shared pieces of the data package: `DatasetInfo`, split names, option checks.

Nothing here imports TensorFlow; the TFDS-backed loaders import it lazily so
that synthetic data and the batch iterator stay cheap to import.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
TASKS = ("classification", "tagging", "regression", "lm", "seq2seq")
INPUT_KINDS = ("float", "tokens")
DATA_DIR_ENV = "GRU_JAX_DATA_DIR"
UNK_CHAR = "\ufffd"  # id 0 of a character vocabulary: characters not seen in training


class DataUnavailableError(RuntimeError):
  """A public dataset is not prepared under its data_dir and cannot be downloaded now."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and trainer need to know about a loaded dataset.

  task: "classification" (labels [N] int32), "tagging" (labels [N,T] int32),
    "regression" (labels [N,K] float32), "lm" (next-token labels [N,T] int32) or
    "seq2seq" (also "decoder_inputs", "labels" and "label_mask" [N,L]).
  input_kind: "float" (inputs [N,T,D] float32) or "tokens" (inputs [N,T] int32).
  input_dim: D for float inputs, the vocabulary size for tokens.
  num_classes: classes or vocabulary size; the output size K for regression.
  seq_len: T, the padded length of every sequence.
  num_examples: split -> number of examples (for the options it was loaded with).
  extras: dataset-specific facts (baselines, vocabularies, normalisation constants).
  """
  name: str
  task: str
  input_kind: str
  input_dim: int
  num_classes: int
  seq_len: int
  num_examples: dict = dataclasses.field(default_factory=dict)
  extras: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
    if self.input_kind not in INPUT_KINDS:
      raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")


def check_int(name: str, value, minimum: int = 1) -> int:
  """Returns `value` as an int, or raises naming the option."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)


def check_choice(name: str, value, choices: Sequence):
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
  return value


def resolve_data_dir(data_dir: str | None) -> str:
  """`data_dir`, else $GRU_JAX_DATA_DIR, else ~/tensorflow_datasets (expanded)."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def cut_points(n: int, fractions=(0.7, 0.15)) -> tuple[int, int]:
  """Boundaries (end of train, end of validation) for a 70/15/15 split of n items."""
  a = int(round(fractions[0] * n))
  b = int(round((fractions[0] + fractions[1]) * n))
  return a, b


def holdout(n: int, num_holdout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Splits range(n) into (keep, held out) index arrays by a seeded draw, each sorted.

  Sorted so that both parts keep the source order; the draw only decides membership.
  """
  held = np.sort(np.random.default_rng(seed).permutation(n)[:num_holdout])
  keep = np.setdiff1d(np.arange(n), held, assume_unique=True)
  return keep, held


def split_rng(seed: int, split: str, stream: int) -> np.random.Generator:
  """Independent NumPy generator per (seed, split, dataset stream)."""
  return np.random.default_rng([check_int("seed", seed, 0), SPLITS.index(split), stream])


_CACHES: list = []


def cache(maxsize: int | None = None):
  """`functools.lru_cache` that `clear_caches` can reach (datasets are cached per process)."""
  def wrap(fn):
    cached = functools.lru_cache(maxsize=maxsize)(fn)
    _CACHES.append(cached)
    return cached
  return wrap


def clear_caches() -> None:
  """Forgets every cached builder, split and loaded dataset in this process."""
  for c in _CACHES:
    c.cache_clear()


def char_lm_arrays(name: str, texts: dict[str, str], split: str, seq_len: int
                   ) -> tuple[dict[str, np.ndarray], DatasetInfo]:
  """A character LM from the three splits' texts: inputs [N,T] int32 and labels
  [N,T] = inputs shifted by one character, N = (len(text) - 1) // T.

  The vocabulary is `UNK_CHAR` (id 0) and the training text's characters in
  code-point order; other splits' unseen characters map to id 0.
  """
  t = check_int("seq_len", seq_len, 1)
  vocab = [UNK_CHAR] + sorted(set(texts["train"]))
  index = {c: i for i, c in enumerate(vocab)}
  sizes = {s: (len(x) - 1) // t for s, x in texts.items()}
  n = sizes[split]
  if n < 1:
    raise ValueError(f"{name} {split!r} has {len(texts[split])} characters, too few "
                     f"for one sequence of seq_len+1={t + 1}")
  ids = np.array([index.get(c, 0) for c in texts[split][:n * t + 1]], np.int32)
  arrays = {"inputs": ids[:-1].reshape(n, t), "labels": ids[1:].reshape(n, t),
            "mask": np.ones((n, t), bool)}
  info = DatasetInfo(name=name, task="lm", input_kind="tokens", input_dim=len(vocab),
                     num_classes=len(vocab), seq_len=t, num_examples=sizes,
                     extras={"vocab": vocab, "unk_id": 0})
  return arrays, info
