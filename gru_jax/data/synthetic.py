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
* ``number_words``: translation-style sequence to sequence (the seed's
  "translation" application; Cho et al. 2014's encoder–decoder): a number's
  digits ("3 0 1 5") to its English words ("three thousand fifteen").  The
  output is longer or shorter than the input and reorders it (teens, tens),
  so a per-step tagger cannot solve it.  Numbers 0–999,999.  The splits hold
  disjoint sets of numbers (90 / 5 / 5 by a fixed hash of the number), so the
  test set asks for numbers never seen in training; each example draws its
  digit count uniformly from those its split holds (training: 1–6; the hash
  leaves no one-digit number to validation or test), then the number.
* ``reversal``: a string of ``min_len``–``max_len`` symbols (lengths uniform)
  from an alphabet of ``num_symbols`` letters, to the same string reversed (the
  first target symbol is the last one the encoder read).  Every target symbol must be
  recalled from one source position, so a decoder that reads the source only
  through one fixed-size context (Cho et al. 2014) fails on long strings,
  while attention (Bahdanau et al. 2015) reads each symbol where it is.

Each split draws from its own generator seeded by (seed, split, dataset), so
a split does not change when another split's size changes.
"""
from __future__ import annotations

import math

import numpy as np

from gru_jax.data.base import SPLITS, DatasetInfo, check_int, split_rng

# The 1/6 of the text above: Var(U(0,1)) = 1/12, two independent values.
ADDING_BASELINE_MSE = 1.0 / 6.0
COPY_SYMBOLS = 10
COPY_CATEGORIES = 8
COPY_BLANK = 8
COPY_DELIMITER = 9
COPY_VOCAB = 10

_ADDING_STREAM, _COPY_STREAM, _WORDS_STREAM, _REVERSAL_STREAM = 1, 2, 3, 4

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
# Shared source/target vocabulary: padding, begin and end of sequence, digits, words.
WORDS_VOCAB = (("<pad>", "<bos>", "<eos>") + tuple("0123456789") + tuple(_ONES)
               + tuple(_TENS) + ("hundred", "thousand"))
WORDS_PAD, WORDS_BOS, WORDS_EOS = 0, 1, 2
WORDS_MAX_DIGITS = 6
# Longest reading below 10^6, 9 words: "seven hundred seventy seven thousand seven hundred
# seventy seven".
WORDS_MAX_WORDS = 9


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


def number_to_words(n: int) -> list[str]:
  """English words of 0 <= n < 10^6, US style without "and": 1015 -> one thousand fifteen."""
  if not 0 <= n < 10 ** WORDS_MAX_DIGITS:
    raise ValueError(f"n must be in [0, 10^{WORDS_MAX_DIGITS}), got {n}")
  if n == 0:
    return ["zero"]

  def below_1000(m):
    out = []
    if m >= 100:
      out += [_ONES[m // 100], "hundred"]
      m %= 100
    if m >= 20:
      out.append(_TENS[m // 10 - 2])
      m %= 10
    if m:
      out.append(_ONES[m])
    return out

  thousands, rest = divmod(n, 1000)
  return (below_1000(thousands) + ["thousand"] if thousands else []) + below_1000(rest)


def _number_split(numbers: np.ndarray) -> np.ndarray:
  """Split index (0 train, 1 validation, 2 test) of each number: 90 / 5 / 5 by a fixed hash."""
  bucket = (numbers.astype(np.uint64) * np.uint64(2654435761) % np.uint64(2 ** 32)) % np.uint64(100)
  return np.where(bucket < 90, 0, np.where(bucket < 95, 1, 2))


def load_number_words(split: str, *, num_train: int = 100_000, num_validation: int = 5_000,
                      num_test: int = 5_000, seed: int = 0, data_dir=None):
  """Digits to English words, a sequence-to-sequence task (shared vocabulary `WORDS_VOCAB`).

  Returns arrays: "inputs" [N,6] int32 digit tokens and "mask" [N,6] (no leading
  zeros; padding after the last digit), "decoder_inputs" [N,10] (<bos> then the
  words), "labels" [N,10] (the words then <eos>) and "label_mask" [N,10].
  """
  del data_dir
  sizes = _sizes(num_train, num_validation, num_test)
  n = sizes[split]
  rng = split_rng(seed, split, _WORDS_STREAM)
  everything = np.arange(10 ** WORDS_MAX_DIGITS)
  mine = everything[_number_split(everything) == SPLITS.index(split)]
  digits = np.where(mine == 0, 1, np.floor(np.log10(np.maximum(mine, 1))).astype(int) + 1)
  pools = [mine[digits == k] for k in range(1, WORDS_MAX_DIGITS + 1)]
  pools = [p for p in pools if len(p)]
  which = rng.integers(0, len(pools), size=n)
  pool_sizes = np.array([len(p) for p in pools])
  starts = np.concatenate([[0], np.cumsum(pool_sizes)[:-1]])
  numbers = np.concatenate(pools)[starts[which] + (rng.random(n) * pool_sizes[which]).astype(int)]
  index = {w: i for i, w in enumerate(WORDS_VOCAB)}
  length = WORDS_MAX_WORDS + 1
  inputs = np.full((n, WORDS_MAX_DIGITS), WORDS_PAD, np.int32)
  dec = np.full((n, length), WORDS_PAD, np.int32)
  labels = np.full((n, length), WORDS_PAD, np.int32)
  for row, num in enumerate(numbers):
    ds = [index[c] for c in str(num)]
    ws = [index[w] for w in number_to_words(int(num))]
    inputs[row, :len(ds)] = ds
    dec[row, :len(ws) + 1] = [WORDS_BOS] + ws
    labels[row, :len(ws) + 1] = ws + [WORDS_EOS]
  arrays = {"inputs": inputs, "mask": inputs != WORDS_PAD, "decoder_inputs": dec,
            "labels": labels, "label_mask": dec != WORDS_PAD}
  v = len(WORDS_VOCAB)
  info = DatasetInfo(name="number_words", task="seq2seq", input_kind="tokens", input_dim=v,
                     num_classes=v, seq_len=WORDS_MAX_DIGITS, num_examples=sizes,
                     extras={"vocab": list(WORDS_VOCAB), "pad_id": WORDS_PAD,
                             "bos_id": WORDS_BOS, "eos_id": WORDS_EOS,
                             "target_len": length, "seed": seed})
  return arrays, info


REVERSAL_PAD, REVERSAL_BOS, REVERSAL_EOS = 0, 1, 2
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def load_reversal(split: str, *, min_len: int = 10, max_len: int = 40, num_symbols: int = 20,
                  num_train: int = 100_000, num_validation: int = 5_000,
                  num_test: int = 5_000, seed: int = 0, data_dir=None):
  """A string of symbols to the same string reversed, a sequence-to-sequence task.

  Vocabulary: <pad>, <bos>, <eos>, then ``num_symbols`` letters "a", "b", ....
  Returns "inputs" [N,max_len] int32 and "mask" [N,max_len] (padding after the
  string), "decoder_inputs" [N,max_len+1] (<bos> then the reversed string),
  "labels" [N,max_len+1] (the reversed string then <eos>) and "label_mask".
  """
  del data_dir
  lo = check_int("min_len", min_len, 1)
  hi = check_int("max_len", max_len, lo)
  k = check_int("num_symbols", num_symbols, 2)
  if k > len(_LETTERS):
    raise ValueError(f"num_symbols must be an int in [2, {len(_LETTERS)}], got {num_symbols}")
  sizes = _sizes(num_train, num_validation, num_test)
  n = sizes[split]
  rng = split_rng(seed, split, _REVERSAL_STREAM)
  lengths = rng.integers(lo, hi + 1, size=n)
  symbols = rng.integers(3, 3 + k, size=(n, hi), dtype=np.int32)
  valid = np.arange(hi)[None] < lengths[:, None]
  inputs = np.where(valid, symbols, REVERSAL_PAD).astype(np.int32)
  # Row i reversed in its first lengths[i] columns: column j reads source column len-1-j.
  src_col = np.clip(lengths[:, None] - 1 - np.arange(hi)[None], 0, hi - 1)
  reversed_ = np.where(valid, np.take_along_axis(inputs, src_col, 1), REVERSAL_PAD)
  rows = np.arange(n)
  labels = np.full((n, hi + 1), REVERSAL_PAD, np.int32)
  labels[:, :hi] = reversed_
  labels[rows, lengths] = REVERSAL_EOS
  dec = np.full((n, hi + 1), REVERSAL_PAD, np.int32)
  dec[:, 0] = REVERSAL_BOS
  dec[:, 1:] = reversed_
  arrays = {"inputs": inputs, "mask": valid, "decoder_inputs": dec, "labels": labels,
            "label_mask": np.arange(hi + 1)[None] <= lengths[:, None]}
  vocab = ["<pad>", "<bos>", "<eos>"] + list(_LETTERS[:k])
  info = DatasetInfo(name="reversal", task="seq2seq", input_kind="tokens", input_dim=len(vocab),
                     num_classes=len(vocab), seq_len=hi, num_examples=sizes,
                     extras={"vocab": vocab, "pad_id": REVERSAL_PAD, "bos_id": REVERSAL_BOS,
                             "eos_id": REVERSAL_EOS, "target_len": hi + 1, "seed": seed,
                             "min_len": lo})
  return arrays, info
