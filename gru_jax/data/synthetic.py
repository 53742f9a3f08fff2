"""Synthetic long-memory benchmarks generated in NumPy from a fixed seed per split.

* ``adding`` (Hochreiter & Schmidhuber 1997, in the form of Le et al. 2015):
  T steps of [value ~ U(0,1), marker]; exactly two markers, one in the first
  half and one in the second; the target is the sum of the two marked values.
  Predicting 1 for every sequence gives MSE = Var(U1 + U2) = 1/6 ≈ 0.167, the
  level a model must beat (Cooijmans et al. 2016; Arjovsky et al. 2016).
* ``copy`` (Arjovsky et al. 2016, copy memory): 10 symbols from 8 categories,
  then `delay` steps (delay−1 blanks and a delimiter), then 10 blanks during
  which the model must output the 10 symbols; blank is the target elsewhere.
  A memoryless model that outputs blank and then a uniform guess reaches
  cross-entropy 10·ln 8 / (T + 20) per step, the baseline to beat.

Each split draws from its own generator seeded by (seed, split, dataset), so
a split does not change when another split's size changes.
"""
from __future__ import annotations

import math

import numpy as np

from gru_jax.data.base import DatasetInfo, check_int, split_rng

# The 1/6 of the text above: Var(U(0,1)) = 1/12, two independent values.
ADDING_BASELINE_MSE = 1.0 / 6.0
COPY_SYMBOLS = 10
COPY_CATEGORIES = 8
COPY_BLANK = 8
COPY_DELIMITER = 9
COPY_VOCAB = 10

_ADDING_STREAM, _COPY_STREAM = 1, 2


def _sizes(num_train, num_validation, num_test) -> dict:
  return {"train": check_int("num_train", num_train, 1),
          "validation": check_int("num_validation", num_validation, 1),
          "test": check_int("num_test", num_test, 1)}


def load_adding(split: str, *, seq_len: int = 200, num_train: int = 100_000,
                num_validation: int = 10_000, num_test: int = 10_000, seed: int = 0,
                data_dir=None):
  """The adding problem: inputs [N,T,2] float32 (value, marker), labels [N,1] float32.

  `data_dir` is accepted (and unused) so every dataset takes the same options.
  """
  del data_dir
  t = check_int("seq_len", seq_len, 2)
  sizes = _sizes(num_train, num_validation, num_test)
  n = sizes[split]
  rng = split_rng(seed, split, _ADDING_STREAM)
  values = rng.random((n, t), dtype=np.float32)
  first = rng.integers(0, t // 2, size=n)
  second = rng.integers(t // 2, t, size=n)
  rows = np.arange(n)
  markers = np.zeros((n, t), np.float32)
  markers[rows, first] = 1.0
  markers[rows, second] = 1.0
  arrays = {
      "inputs": np.stack([values, markers], axis=-1),
      "labels": (values[rows, first] + values[rows, second])[:, None],
      "mask": np.ones((n, t), bool),
  }
  info = DatasetInfo(name="adding", task="regression", input_kind="float", input_dim=2,
                     num_classes=1, seq_len=t, num_examples=sizes,
                     extras={"baseline_mse": ADDING_BASELINE_MSE, "seed": seed})
  return arrays, info


def copy_baseline_xent(delay: int) -> float:
  """Per-step cross-entropy (nats) of the memoryless strategy: 10·ln 8 / (T + 20)."""
  return COPY_SYMBOLS * math.log(COPY_CATEGORIES) / (delay + 2 * COPY_SYMBOLS)


def load_copy(split: str, *, delay: int = 100, num_train: int = 100_000,
              num_validation: int = 10_000, num_test: int = 10_000, seed: int = 0,
              data_dir=None):
  """Copy memory: inputs and labels [N,T+20] int32 tokens (0-7 data, 8 blank, 9 delimiter).

  Input:  s_1..s_10, blank x (T-1), delimiter, blank x 10.
  Labels: blank x (T+10), s_1..s_10.
  """
  del data_dir
  t = check_int("delay", delay, 1)
  sizes = _sizes(num_train, num_validation, num_test)
  n = sizes[split]
  length = t + 2 * COPY_SYMBOLS
  rng = split_rng(seed, split, _COPY_STREAM)
  symbols = rng.integers(0, COPY_CATEGORIES, size=(n, COPY_SYMBOLS), dtype=np.int32)
  inputs = np.full((n, length), COPY_BLANK, np.int32)
  inputs[:, :COPY_SYMBOLS] = symbols
  inputs[:, COPY_SYMBOLS + t - 1] = COPY_DELIMITER
  labels = np.full((n, length), COPY_BLANK, np.int32)
  labels[:, -COPY_SYMBOLS:] = symbols
  arrays = {"inputs": inputs, "labels": labels, "mask": np.ones((n, length), bool)}
  info = DatasetInfo(name="copy", task="tagging", input_kind="tokens", input_dim=COPY_VOCAB,
                     num_classes=COPY_VOCAB, seq_len=length, num_examples=sizes,
                     extras={"baseline_xent": copy_baseline_xent(t), "delay": t,
                             "blank": COPY_BLANK, "delimiter": COPY_DELIMITER, "seed": seed})
  return arrays, info
