"""Public TFDS datasets (downloaded by TFDS the first time, then read from data_dir).

* ``mnist`` -- sequential MNIST: each 28x28 image read one pixel per step,
  inputs [N,784,1] in [0,1]; `permuted=True` applies one fixed pixel
  permutation (NumPy seed 0, in extras["permutation"]).  Splits: TFDS test
  (10,000) is the test split; 5,000 of the 60,000 TFDS train images, drawn with
  seed 0, are the validation split and the other 55,000 are train.
  Literature (Cooijmans et al. 2016, Recurrent Batch Normalization): LSTM
  98.9% / BN-LSTM 99.0% test accuracy sequential; permuted 90.2% / 95.4%.
  Expect a well-tuned GRU in the same ranges (~98-99% and ~90-95%).
* ``imdb_reviews`` -- binary sentiment: lower-cased word tokens (letters,
  digits, apostrophes, and "!" "?"), vocabulary of the `vocab_size` most
  frequent train words (ids 0 = padding, 1 = out of vocabulary), the last
  `max_len` tokens kept (Keras' default truncation: reviews tend to end with the
  verdict), padded on the right with a mask.  Splits: TFDS test (25,000);
  2,500 of the 25,000 TFDS train reviews (seed 0) are validation, 22,500 train;
  the vocabulary comes from train only.  Literature: a single-layer (bi)GRU
  trained from scratch reaches about 86-89% test accuracy.
* ``tiny_shakespeare`` -- character language model: the vocabulary is the
  train text's characters (id 0 stands for characters never seen in train),
  each split's text is cut into consecutive windows of `seq_len`+1 characters
  overlapping by one, inputs [N,T] are the first T and labels [N,T] the next
  characters, so every character except the first is predicted exactly once.
  extras["vocab"] maps ids back to characters for sampling.  ANCHORS.md has no
  figure for this corpus (Cooijmans et al. report 1.36 bits/char on text8).
"""
from __future__ import annotations

import collections
import re

import numpy as np
import tensorflow_datasets as tfds

from gru_jax.data import tfds_io
from gru_jax.data.base import (SPLITS, UNK_CHAR, DatasetInfo, cache, char_lm_arrays,  # noqa: F401
                               check_int, holdout, resolve_data_dir)

MNIST_PERMUTATION_SEED = 0
MNIST_VALIDATION = 5_000 / 60_000  # fraction of TFDS train held out
IMDB_VALIDATION = 2_500 / 25_000
HOLDOUT_SEED = 0
PAD_ID, UNK_ID = 0, 1

_WORD = re.compile(r"[a-z0-9']+|[!?]")


# Where each dataset downloads from (TFDS's own sources), probed before a first download.
HOSTS = {"mnist": ("storage.googleapis.com", 443), "imdb_reviews": ("ai.stanford.edu", 80),
         "tiny_shakespeare": ("raw.githubusercontent.com", 443)}


@cache(maxsize=None)
def _builder(name: str, data_dir: str):
  return tfds_io.prepare(tfds.builder(name, data_dir=data_dir), local=False,
                         host=HOSTS.get(name))


@cache(maxsize=4)
def _read(name: str, tfds_split: str, data_dir: str) -> dict[str, np.ndarray]:
  return tfds_io.read_split(_builder(name, data_dir), tfds_split)


def _train_holdout(name: str, data_dir: str, fraction: float) -> tuple[dict, dict]:
  """(rows of TFDS train that are our train, rows that are our validation); sizes by split."""
  n = tfds_io.split_size(_builder(name, data_dir), "train")
  if n is None:  # unknown under mock data: count by reading
    n = len(_read(name, "train", data_dir)["label"])
  keep, held = holdout(n, int(round(fraction * n)), HOLDOUT_SEED)
  test_n = tfds_io.split_size(_builder(name, data_dir), "test")
  if test_n is None:  # unknown under mock data: count by reading
    test_n = len(_read(name, "test", data_dir)["label"])
  return {"train": keep, "validation": held}, {"train": len(keep), "validation": len(held),
                                               "test": test_n}


def _split_rows(name: str, split: str, data_dir: str, fraction: float,
                shard: tuple[int, int] | None = None):
  """The TFDS examples of our `split` and the sizes of all our splits.

  With ``shard=(i, S)`` only TFDS rows `shard_bounds(N, i, S)` of the TFDS
  split are read, and our split's rows among them kept: the S shards
  partition our split.
  """
  rows, sizes = _train_holdout(name, data_dir, fraction)
  builder = _builder(name, data_dir)
  if split == "test":
    if shard is None:
      return _read(name, "test", data_dir), sizes
    return tfds_io.read_split(builder, "test", shard), sizes
  if shard is None:
    ex = _read(name, "train", data_dir)
    return {k: v[rows[split]] for k, v in ex.items()}, sizes
  lo, hi = tfds_io.shard_rows(builder, "train", shard)
  ex = tfds_io.read_split(builder, "train", shard)  # rows [lo, hi)
  mine = rows[split][(rows[split] >= lo) & (rows[split] < hi)] - lo
  return {k: v[mine] for k, v in ex.items()}, sizes


def mnist_permutation() -> np.ndarray:
  """The fixed pixel order [784] of permuted MNIST."""
  return np.random.default_rng(MNIST_PERMUTATION_SEED).permutation(784)


def load_mnist(split: str, *, permuted: bool = False, data_dir: str | None = None,
               shard: tuple[int, int] | None = None):
  """Sequential (or permuted) MNIST: inputs [N,784,1] float32 in [0,1], labels [N] int32.

  ``shard=(i, S)`` reads only the i-th of S row ranges of the TFDS split.
  """
  if not isinstance(permuted, bool):
    raise ValueError(f"permuted must be a bool, got {permuted!r}")
  ex, sizes = _split_rows("mnist", split, resolve_data_dir(data_dir), MNIST_VALIDATION, shard)
  n = len(ex["label"])
  pixels = ex["image"].reshape(n, 784)
  perm = mnist_permutation() if permuted else None
  if perm is not None:
    pixels = pixels[:, perm]
  inputs = (pixels.astype(np.float32) / 255.0)[..., None]
  arrays = {"inputs": inputs, "labels": ex["label"].astype(np.int32),
            "mask": np.ones((n, 784), bool)}
  info = DatasetInfo(name="mnist", task="classification", input_kind="float", input_dim=1,
                     num_classes=10, seq_len=784, num_examples=sizes,
                     extras={"permuted": permuted, "permutation": perm})
  return arrays, info


def tokenize(text: str | bytes) -> list[str]:
  """Lower-cased word tokens of a review; HTML line breaks become spaces."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  return _WORD.findall(text.lower().replace("<br />", " "))


@cache(maxsize=4)
def _imdb_vocab(data_dir: str, vocab_size: int) -> tuple[str, ...]:
  """["<pad>", "<unk>", the vocab_size-2 most frequent train words]; ties alphabetical."""
  ex, _ = _split_rows("imdb_reviews", "train", data_dir, IMDB_VALIDATION)
  counts = collections.Counter()
  for text in ex["text"]:
    counts.update(tokenize(text))
  words = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size - 2]
  return ("<pad>", "<unk>", *words)


def load_imdb_reviews(split: str, *, vocab_size: int = 20_000, max_len: int = 400,
                      data_dir: str | None = None):
  """IMDB sentiment: inputs [N,max_len] int32 word ids, labels [N] int32 (1 = positive).

  mask [N,max_len] is True on the real tokens, a prefix of each row; a review
  with no tokens becomes a single out-of-vocabulary token so no mask row is empty.
  """
  v = check_int("vocab_size", vocab_size, 3)
  t = check_int("max_len", max_len, 1)
  data_dir = resolve_data_dir(data_dir)
  vocab = _imdb_vocab(data_dir, v)
  index = {w: i for i, w in enumerate(vocab)}
  ex, sizes = _split_rows("imdb_reviews", split, data_dir, IMDB_VALIDATION)
  n = len(ex["label"])
  inputs = np.full((n, t), PAD_ID, np.int32)
  mask = np.zeros((n, t), bool)
  for row, text in enumerate(ex["text"]):
    ids = [index.get(w, UNK_ID) for w in tokenize(text)][-t:] or [UNK_ID]
    inputs[row, :len(ids)] = ids
    mask[row, :len(ids)] = True
  arrays = {"inputs": inputs, "labels": ex["label"].astype(np.int32), "mask": mask}
  info = DatasetInfo(name="imdb_reviews", task="classification", input_kind="tokens",
                     input_dim=len(vocab), num_classes=2, seq_len=t, num_examples=sizes,
                     extras={"vocab": list(vocab), "pad_id": PAD_ID, "unk_id": UNK_ID})
  return arrays, info


def _shakespeare_text(data_dir: str, split: str) -> str:
  # One example per split in the real data; mocked data has several, joined in order.
  texts = _read("tiny_shakespeare", split, data_dir)["text"]
  return "".join(t.decode("utf-8") for t in texts)


def load_tiny_shakespeare(split: str, *, seq_len: int = 100, data_dir: str | None = None):
  """Character LM: inputs [N,seq_len] int32, labels [N,seq_len] int32 = inputs shifted by one."""
  check_int("seq_len", seq_len, 1)
  data_dir = resolve_data_dir(data_dir)
  texts = {s: _shakespeare_text(data_dir, s) for s in SPLITS}
  return char_lm_arrays("tiny_shakespeare", texts, split, seq_len)
