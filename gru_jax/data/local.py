"""Datasets that ship with scikit-learn and statsmodels, as local TFDS builders.

Both builders read from the installed package in `_split_generators` (nothing
is downloaded) and are prepared once into the TFDS data_dir, so they go through
the same TFDS path as the public sets.

* ``sequential_digits``: scikit-learn's 1,797 8x8 digits, pixel values / 16 in
  [0,1], read as 8 rows of 8 pixels ([N,8,8]) or pixel by pixel ([N,64,1]).
  Splits: a shuffle of the 1,797 rows with NumPy seed 0, then 70/15/15
  (1,258 train / 269 validation / 270 test); each split in sklearn row order.
  Reference results (ANCHORS.md): the founding document's Keras model
  (GRU128-BN-Dropout x2, 10 epochs, a different 80/20 split) reaches only
  0.30-0.58 validation accuracy because BatchNorm's running averages lag;
  without BatchNorm 0.85 at 10 epochs, with BN 0.93 at 50 epochs.
* ``sunspots``: the yearly mean sunspot numbers 1700-2008 (statsmodels), split
  chronologically 70/15/15 (train 1700-1915, validation 1916-1962, test
  1963-2008).  Loaded as windows of the `window` preceding years -> next year,
  normalised by the train years' mean and std.  Validation and test windows
  take their context from the preceding years (which may be in an earlier
  split); targets never leak.  `sunspots_baselines` gives the persistence and
  ARIMA test RMSE a model must beat, in sunspot units.
* ``python_docs``: a character language model on the English documentation
  that CPython ships for `help()` (``pydoc_data.topics``: the language
  reference's statements, operators and data model; 465k characters in Python
  3.11).  Topics are joined in name order and the text is cut contiguously
  90/5/5, mid-topic (in 3.11.7 validation is the end of "typesmapping" to the
  middle of "typesseq"; three quarters of test are the sequence-type tables of
  "typesseq" and "typesseq-mutable", then "unary", "while", "with", "yield"),
  then into windows as for tiny_shakespeare.  The text is the running Python's
  and changes with every release, so results compare only for one text: the
  TFDS config is named by the Python version and the text's sha256
  (``py311_71f2ff5d``), extras hold "python_version" and "sha256".
  `python_docs_baselines` gives interpolated Witten-Bell n-gram bits per
  character on the same targets.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import warnings

import numpy as np
import tensorflow_datasets as tfds

from gru_jax.data import tfds_io
from gru_jax.data.base import (SPLITS, DatasetInfo, cache, char_lm_arrays, check_choice,
                               check_int, cut_points, resolve_data_dir)

DIGITS_SPLIT_SEED = 0
DIGITS_SCALE = 16.0  # sklearn digits pixels are counts 0..16
ARIMA_ORDER = (9, 0, 0)  # AR(9): the classic sunspot model (11-year cycle within the lags)


def digits_split_indices(num_rows: int) -> dict[str, np.ndarray]:
  """sklearn row indices of each split: seeded permutation (seed 0), then 70/15/15, sorted."""
  perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(num_rows)
  a, b = cut_points(num_rows)
  return {"train": np.sort(perm[:a]), "validation": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def _statsmodels_sunspots() -> tuple[np.ndarray, np.ndarray]:
  """(years [309] int32, values [309] float64) in chronological order."""
  import statsmodels.api as sm
  df = sm.datasets.sunspots.load_pandas().data
  return df["YEAR"].to_numpy().astype(np.int32), df["SUNACTIVITY"].to_numpy(np.float64)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose data ships with an installed package."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Nothing is downloaded, so there is no checksums file to find.  Skipping the
  # lookup also avoids tfds importing importlib_resources, which tfds does not
  # declare as a dependency on Python >= 3.9.
  code_path = None


class SequentialDigits(_LocalBuilder):
  """scikit-learn's 8x8 digits with fixed 70/15/15 splits; see the module docstring."""

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's 1,797 8x8 handwritten digits, pixel counts 0..16.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": tfds.features.Scalar(dtype=np.int32),  # row in sklearn's load_digits
        }),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: sklearn ships the data
    from sklearn.datasets import load_digits
    digits = load_digits()
    parts = digits_split_indices(len(digits.target))
    return {s: self._generate_examples(digits, parts[s]) for s in SPLITS}

  def _generate_examples(self, digits, rows):
    for i in rows:
      yield int(i), {"image": digits.images[i].astype(np.uint8),
                     "label": int(digits.target[i]), "index": int(i)}


class Sunspots(_LocalBuilder):
  """Yearly sunspot numbers 1700-2008, chronological 70/15/15 splits."""

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Yearly mean total sunspot number 1700-2008 (statsmodels.datasets.sunspots).",
        features=tfds.features.FeaturesDict({
            "year": tfds.features.Scalar(dtype=np.int32),
            # Tenths as int: TFDS serialises floats as float32, the data has one decimal.
            "value_tenths": tfds.features.Scalar(dtype=np.int32),
        }),
        homepage="https://www.statsmodels.org/stable/datasets/generated/sunspots.html")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: statsmodels ships the data
    years, values = _statsmodels_sunspots()
    a, b = cut_points(len(years))
    bounds = {"train": (0, a), "validation": (a, b), "test": (b, len(years))}
    return {s: self._generate_examples(years[lo:hi], values[lo:hi])
            for s, (lo, hi) in bounds.items()}

  def _generate_examples(self, years, values):
    tenths = np.round(values * 10)
    if not np.array_equal(tenths / 10, values):
      raise ValueError("sunspot values are expected to have one decimal")
    for y, v in zip(years, tenths):
      yield int(y), {"year": int(y), "value_tenths": int(v)}


PYTHON_DOCS_FRACTIONS = (0.9, 0.05)
PYTHON_DOCS_SEPARATOR = "\n\n"


def python_docs_text() -> str:
  """The running Python's pydoc topics, joined in topic-name order."""
  from pydoc_data.topics import topics
  return PYTHON_DOCS_SEPARATOR.join(topics[k] for k in sorted(topics))


class PythonDocs(_LocalBuilder):
  """CPython's pydoc topics as one text per split (90/5/5, contiguous); see the module docstring."""
  # Every Python release regenerates the text: one config per text, so a data_dir
  # prepared under another release is never read as this one's.
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=f"py{sys.version_info.major}{sys.version_info.minor}_"
           f"{hashlib.sha256(python_docs_text().encode()).hexdigest()[:8]}",
      description=f"pydoc_data.topics of Python {platform.python_version()}")]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="The English documentation topics CPython ships for help() (pydoc_data).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        homepage="https://docs.python.org/3/reference/")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the text ships with Python
    text = python_docs_text()
    a, b = cut_points(len(text), PYTHON_DOCS_FRACTIONS)
    parts = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
    return {s: self._generate_examples(parts[s]) for s in SPLITS}

  def _generate_examples(self, text):
    yield 0, {"text": text}


@cache(maxsize=None)
def _builder(cls, data_dir: str):
  return tfds_io.prepare(cls(data_dir=data_dir), local=True)


@cache(maxsize=None)
def _python_docs_texts(data_dir: str) -> dict[str, str]:
  builder = _builder(PythonDocs, data_dir)
  return {s: tfds_io.read_split(builder, s)["text"][0].decode("utf-8") for s in SPLITS}


def load_python_docs(split: str, *, seq_len: int = 100, data_dir: str | None = None):
  """Character LM on Python's docs: inputs [N,seq_len] int32, labels [N,seq_len] int32 =
  inputs shifted by one character (extras: "vocab", "python_version", "sha256")."""
  check_int("seq_len", seq_len, 1)
  texts = _python_docs_texts(resolve_data_dir(data_dir))
  arrays, info = char_lm_arrays("python_docs", texts, split, seq_len)
  whole = "".join(texts[s] for s in SPLITS).encode("utf-8")
  info.extras.update(python_version=platform.python_version(),
                     sha256=hashlib.sha256(whole).hexdigest())
  return arrays, info


def python_docs_baselines(seq_len: int = 100, order: int = 5, *, split: str = "test",
                          data_dir: str | None = None) -> dict:
  """Bits per character on a split's LM targets (the characters a model with
  this `seq_len` predicts) of interpolated Witten-Bell n-grams of orders
  1..`order`, trained on the train split (`gru_jax.data.ngram`).  Each target
  is scored with its preceding characters as context, across window boundaries,
  which a model that starts every window from a zero state does not see.
  """
  return dict(_docs_baselines(check_int("seq_len", seq_len, 1), check_int("order", order, 1),
                              check_choice("split", split, SPLITS), resolve_data_dir(data_dir)))


@cache(maxsize=None)
def _docs_baselines(seq_len: int, order: int, split: str, data_dir: str) -> dict:
  from gru_jax.data.ngram import WittenBell
  texts = _python_docs_texts(data_dir)
  _, info = load_python_docs(split, seq_len=seq_len, data_dir=data_dir)
  index = {c: i for i, c in enumerate(info.extras["vocab"])}
  encode = lambda text: [index.get(c, 0) for c in text]
  n = info.num_examples[split]
  model = WittenBell(encode(texts["train"]), order, info.num_classes)
  bits = model.bits_per_char(encode(texts[split][:n * seq_len + 1]))
  return {**{f"order_{k + 1}_bpc": b for k, b in enumerate(bits)},
          "order": order, "seq_len": seq_len, "split": split, "characters": n * seq_len}


def load_sequential_digits(split: str, *, pixels: str = "rows", data_dir: str | None = None,
                           shard: tuple[int, int] | None = None):
  """Digits as sequences: `pixels="rows"` -> inputs [N,8,8], `"pixels"` -> [N,64,1]; labels [N].

  ``shard=(i, S)`` reads only TFDS rows `shard_bounds(N, i, S)` of the split.
  """
  check_choice("pixels", pixels, ("rows", "pixels"))
  builder = _builder(SequentialDigits, resolve_data_dir(data_dir))
  ex = tfds_io.read_split(builder, split, shard)
  order = np.argsort(ex["index"])  # TFDS stores examples shuffled; restore sklearn row order
  images = ex["image"][order].astype(np.float32) / DIGITS_SCALE
  n = len(order)
  inputs = images if pixels == "rows" else images.reshape(n, 64, 1)
  arrays = {"inputs": inputs, "labels": ex["label"][order].astype(np.int32),
            "mask": np.ones(inputs.shape[:2], bool)}
  info = DatasetInfo(
      name="sequential_digits", task="classification", input_kind="float",
      input_dim=inputs.shape[2], num_classes=10, seq_len=inputs.shape[1],
      num_examples={s: tfds_io.split_size(builder, s) for s in SPLITS},
      extras={"pixels": pixels, "sklearn_index": ex["index"][order].astype(np.int64),
              "split_seed": DIGITS_SPLIT_SEED})
  return arrays, info


def _sunspot_series(data_dir: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """The series from TFDS: years [n], values [n] float64, (train end, validation end)."""
  builder = _builder(Sunspots, data_dir)
  parts = [tfds_io.read_split(builder, s) for s in SPLITS]
  years = np.concatenate([p["year"] for p in parts])
  values = np.concatenate([p["value_tenths"] for p in parts]) / 10.0  # exactly statsmodels' floats
  order = np.argsort(years)  # TFDS stores examples shuffled
  a = len(parts[0]["year"])
  return years[order], values[order], (a, a + len(parts[1]["year"]))


def _check_window(window, num_train: int) -> int:
  w = check_int("window", window, 1)
  if w >= num_train:
    raise ValueError(f"window must be < the {num_train} train years, got {w}")
  return w


def _windows(series: np.ndarray, w: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
  """Inputs [hi-lo, w] = series[t-w:t] and targets [hi-lo] = series[t] for t in [lo, hi)."""
  inputs = np.lib.stride_tricks.sliding_window_view(series, w)[lo - w:hi - w]
  return inputs, series[lo:hi]


def _target_range(split: str, w: int, a: int, b: int, n: int) -> tuple[int, int]:
  return {"train": (w, a), "validation": (a, b), "test": (b, n)}[split]


def load_sunspots(split: str, *, window: int = 20, data_dir: str | None = None):
  """Windows of normalised sunspot numbers: inputs [N,window,1], labels [N,1] float32.

  Normalisation uses the train years' mean and std (extras "mean", "std"):
  value = label * std + mean.  extras["years"] [N] gives each target's year.
  """
  data_dir = resolve_data_dir(data_dir)
  years, values, (a, b) = _sunspot_series(data_dir)
  w = _check_window(window, a)
  mean, std = float(values[:a].mean()), float(values[:a].std())
  z = (values - mean) / std
  n = len(values)
  lo, hi = _target_range(split, w, a, b, n)
  inputs, targets = _windows(z, w, lo, hi)
  arrays = {"inputs": inputs[..., None].astype(np.float32),
            "labels": targets[:, None].astype(np.float32),
            "mask": np.ones((hi - lo, w), bool)}
  info = DatasetInfo(
      name="sunspots", task="regression", input_kind="float", input_dim=1, num_classes=1,
      seq_len=w, num_examples={"train": a - w, "validation": b - a, "test": n - b},
      extras={"mean": mean, "std": std, "window": w, "years": years[lo:hi].copy(),
              "baselines": sunspots_baselines(w, data_dir=data_dir)})
  return arrays, info


def sunspots_baselines(window: int = 20, *, data_dir: str | None = None,
                       arima_order: tuple[int, int, int] = ARIMA_ORDER) -> dict:
  """Test-year RMSEs (sunspot units) of simple forecasters, one step ahead.

  * "persistence_rmse": next year = this year.
  * "arima_rmse": statsmodels ARIMA(`arima_order`) fitted on the train and
    validation years, then run over the test years with fixed parameters
    (`results.append(test, refit=False)`), so each forecast sees only the past.
  * "linear_rmse": least squares with intercept on the same `window`-year train
    windows a model sees (the one baseline that depends on `window`).
  """
  return dict(_baselines(check_int("window", window, 1), resolve_data_dir(data_dir),
                         tuple(arima_order)))


@cache(maxsize=None)
def _baselines(window: int, data_dir: str, arima_order: tuple) -> dict:
  from statsmodels.tsa.arima.model import ARIMA
  years, values, (a, b) = _sunspot_series(data_dir)
  w = _check_window(window, a)
  n = len(values)
  test = values[b:]

  def rmse(pred):
    return float(np.sqrt(np.mean((pred - test) ** 2)))

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # optimiser convergence chatter; the fit is checked by RMSE
    fit = ARIMA(values[:b], order=arima_order).fit()
    arima_pred = fit.append(test, refit=False).predict(start=b, end=n - 1)

  x_train, y_train = _windows(values, w, w, a)
  x_test, _ = _windows(values, w, b, n)
  design = np.hstack([x_train, np.ones((len(x_train), 1))])
  coef, *_ = np.linalg.lstsq(design, y_train, rcond=None)
  linear_pred = np.hstack([x_test, np.ones((len(x_test), 1))]) @ coef

  return {"persistence_rmse": rmse(values[b - 1:n - 1]), "arima_rmse": rmse(arima_pred),
          "arima_order": arima_order, "linear_rmse": rmse(linear_pred), "window": w,
          "test_years": (int(years[b]), int(years[-1]))}
