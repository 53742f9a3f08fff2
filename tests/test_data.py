"""gru_jax.data: loaders against independent references, and the batch iterator's contract."""
import math
import subprocess
import sys

import numpy as np
import pytest

from gru_jax import data

SMALL_ADDING = dict(seq_len=20, num_train=64, num_validation=32, num_test=32)
SMALL_COPY = dict(delay=7, num_train=50, num_validation=20, num_test=20)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One TFDS data_dir for the local builders, so each is prepared once per run."""
  return str(tmp_path_factory.mktemp("tfds"))


def check_arrays(arrays, info, split, n):
  """The documented shapes and dtypes for `info`'s task and input kind."""
  t = info.seq_len
  assert arrays["mask"].shape == (n, t) and arrays["mask"].dtype == bool
  if info.input_kind == "float":
    assert arrays["inputs"].shape == (n, t, info.input_dim)
    assert arrays["inputs"].dtype == np.float32
  else:
    assert arrays["inputs"].shape == (n, t) and arrays["inputs"].dtype == np.int32
    assert 0 <= arrays["inputs"].min() and arrays["inputs"].max() < info.input_dim
  want = {"classification": ((n,), np.int32), "tagging": ((n, t), np.int32),
          "lm": ((n, t), np.int32), "regression": ((n, info.num_classes), np.float32)}[info.task]
  assert (arrays["labels"].shape, arrays["labels"].dtype) == want
  if info.task != "regression":
    assert 0 <= arrays["labels"].min() and arrays["labels"].max() < info.num_classes
  assert info.num_examples[split] == n


# ---------------------------------------------------------------- sequential_digits

@pytest.mark.parametrize("pixels,shape", [("rows", (8, 8)), ("pixels", (64, 1))])
def test_digits_shapes_values_and_disjoint_splits(data_dir, pixels, shape):
  from sklearn.datasets import load_digits
  ref = load_digits()
  seen = []
  for split, n in zip(data.SPLITS, (1258, 269, 270)):
    arrays, info = data.load("sequential_digits", split, pixels=pixels, data_dir=data_dir)
    assert (info.task, info.input_kind, info.num_classes) == ("classification", "float", 10)
    assert arrays["inputs"].shape == (n, *shape)
    check_arrays(arrays, info, split, n)
    assert arrays["mask"].all()
    rows = info.extras["sklearn_index"]
    want = (ref.images[rows] / 16.0).astype(np.float32).reshape(n, *shape)
    np.testing.assert_array_equal(arrays["inputs"], want)
    np.testing.assert_array_equal(arrays["labels"], ref.target[rows])
    seen.append(rows)
  all_rows = np.concatenate(seen)
  assert len(np.unique(all_rows)) == len(all_rows) == 1797  # disjoint and complete


def test_digits_split_recipe_is_the_documented_one(data_dir):
  # Seeded shuffle (seed 0), then 70/15/15: fixed forever, so results stay comparable.
  perm = np.random.default_rng(0).permutation(1797)
  _, info = data.load("sequential_digits", "validation", data_dir=data_dir)
  np.testing.assert_array_equal(info.extras["sklearn_index"], np.sort(perm[1258:1527]))


def test_digits_is_a_registered_tfds_builder(data_dir):
  import tensorflow_datasets as tfds
  data.load("sequential_digits", "test", data_dir=data_dir)  # registers and prepares
  builder = tfds.builder("sequential_digits", data_dir=data_dir)
  assert builder.info.splits["train"].num_examples == 1258
  assert tfds.builder("sunspots", data_dir=data_dir).name == "sunspots"


def test_loaded_arrays_are_read_only_and_info_is_a_copy(data_dir):
  arrays, info = data.load("sequential_digits", "test", data_dir=data_dir)
  with pytest.raises(ValueError):
    arrays["inputs"][0, 0, 0] = 1.0
  info.extras["pixels"] = "changed"
  assert data.load("sequential_digits", "test", data_dir=data_dir)[1].extras["pixels"] == "rows"


# ---------------------------------------------------------------- sunspots

def raw_sunspots():
  import statsmodels.api as sm
  df = sm.datasets.sunspots.load_pandas().data
  return df["YEAR"].to_numpy().astype(int), df["SUNACTIVITY"].to_numpy(np.float64)


@pytest.mark.parametrize("window", [20, 5])
def test_sunspots_windows_are_slices_of_the_raw_series(data_dir, window):
  years, values = raw_sunspots()
  mean, std = values[:216].mean(), values[:216].std()  # train = first 216 of 309 years
  want_years = {"train": years[window:216], "validation": years[216:263], "test": years[263:]}
  for split in data.SPLITS:
    arrays, info = data.load("sunspots", split, window=window, data_dir=data_dir)
    n = len(want_years[split])
    check_arrays(arrays, info, split, n)
    assert arrays["inputs"].shape == (n, window, 1) and info.seq_len == window
    assert info.extras["mean"] == pytest.approx(mean) and info.extras["std"] == pytest.approx(std)
    np.testing.assert_array_equal(info.extras["years"], want_years[split])
    t = info.extras["years"] - 1700  # position of each target in the series
    windows = np.stack([values[i - window:i] for i in t])
    np.testing.assert_allclose(arrays["inputs"][..., 0] * std + mean, windows, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(arrays["labels"][:, 0] * std + mean, values[t], rtol=1e-5,
                               atol=1e-4)


def test_sunspots_baselines(data_dir):
  _, values = raw_sunspots()
  test, previous = values[263:], values[262:-1]
  persistence = math.sqrt(sum((a - b) ** 2 for a, b in zip(test, previous)) / len(test))
  got = data.sunspots_baselines(20, data_dir=data_dir)
  assert got["persistence_rmse"] == pytest.approx(persistence, rel=1e-12)
  assert got["test_years"] == (1963, 2008)
  # AR(9) and the linear window model use the cycle, so they beat persistence.
  assert 0 < got["arima_rmse"] < got["persistence_rmse"]
  assert 0 < got["linear_rmse"] < got["persistence_rmse"]
  _, info = data.load("sunspots", "test", data_dir=data_dir)
  assert info.extras["baselines"] == got


# ---------------------------------------------------------------- python_docs

def test_python_docs_is_pythons_own_documentation(data_dir):
  """The splits are CPython's pydoc topics, joined in name order and cut 90/5/5, as
  next-character windows over the train split's vocabulary."""
  import hashlib
  import pydoc_data.topics
  topics = pydoc_data.topics.topics
  text = "\n\n".join(topics[k] for k in sorted(topics))
  a, b = round(0.9 * len(text)), round(0.95 * len(text))
  parts = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
  vocab = ["\ufffd"] + sorted(set(parts["train"]))
  for split, part in parts.items():
    arrays, info = data.load("python_docs", split, seq_len=50, data_dir=data_dir)
    n = (len(part) - 1) // 50
    check_arrays(arrays, info, split, n)
    assert info.task == "lm" and info.extras["vocab"] == vocab
    assert info.num_classes == info.input_dim == len(vocab)
    assert arrays["mask"].all()
    known = np.array([c in vocab for c in part[:n * 50 + 1]])
    # Every window starts where the previous one's labels end.
    np.testing.assert_array_equal(arrays["inputs"][1:, 0], arrays["labels"][:-1, -1])
    np.testing.assert_array_equal(arrays["inputs"][:, 1:], arrays["labels"][:, :-1])
    got = "".join(np.array(vocab)[np.concatenate([arrays["inputs"][0, :1],
                                                  arrays["labels"].reshape(-1)])])
    want = "".join(c if k else "\ufffd" for c, k in zip(part[:n * 50 + 1], known))
    assert got == want
  assert info.extras["sha256"] == hashlib.sha256(text.encode()).hexdigest()
  import platform
  assert info.extras["python_version"] == platform.python_version()
  # The prepared data is named by the text it holds, so another release's is never read.
  from gru_jax.data.local import PythonDocs
  version = f"py{sys.version_info.major}{sys.version_info.minor}"
  assert [c.name for c in PythonDocs.BUILDER_CONFIGS] == [f"{version}_{info.extras['sha256'][:8]}"]


def test_python_docs_baselines_score_the_lm_targets(data_dir):
  """The n-gram baselines are Witten-Bell trained on the whole train text, scored on
  exactly the test characters a model predicts."""
  import pydoc_data.topics
  from gru_jax.data.ngram import WittenBell
  topics = pydoc_data.topics.topics
  text = "\n\n".join(topics[k] for k in sorted(topics))
  a, b = round(0.9 * len(text)), round(0.95 * len(text))
  arrays, info = data.load("python_docs", "test", seq_len=50, data_dir=data_dir)
  got = data.python_docs_baselines(seq_len=50, order=3, data_dir=data_dir)
  assert got["characters"] == arrays["labels"].size and got["split"] == "test"
  index = {c: i for i, c in enumerate(info.extras["vocab"])}
  encode = lambda t: [index.get(c, 0) for c in t]
  model = WittenBell(encode(text[:a]), 3, info.num_classes)
  # The targets: the labels, i.e. test characters 1 .. N*T.
  test_ids = encode(text[b:b + arrays["labels"].size + 1])
  np.testing.assert_array_equal(test_ids[1:], arrays["labels"].reshape(-1))
  want = model.bits_per_char(test_ids)
  assert [got[f"order_{k}_bpc"] for k in (1, 2, 3)] == want
  # Context helps, and the unigram is near the train text's character entropy.
  p = np.bincount(encode(text[:a]), minlength=info.num_classes) / a
  entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
  assert abs(got["order_1_bpc"] - entropy) < 0.2
  assert got["order_1_bpc"] > got["order_2_bpc"] > got["order_3_bpc"] > 1.0


# ---------------------------------------------------------------- synthetic

def test_adding_targets_are_the_marked_sums():
  for split in data.SPLITS:
    arrays, info = data.load("adding", split, **SMALL_ADDING)
    n = SMALL_ADDING[f"num_{split}"]
    check_arrays(arrays, info, split, n)
    values, markers = arrays["inputs"][..., 0], arrays["inputs"][..., 1]
    assert ((0 <= values) & (values < 1)).all()
    assert set(np.unique(markers)) == {0.0, 1.0}
    np.testing.assert_array_equal(markers[:, :10].sum(1), 1)  # one marker per half
    np.testing.assert_array_equal(markers[:, 10:].sum(1), 1)
    np.testing.assert_allclose(arrays["labels"][:, 0], (values * markers).sum(1), atol=1e-6)


def test_adding_baseline_mse_is_one_sixth():
  arrays, info = data.load("adding", "train", seq_len=10, num_train=20_000)
  mse = np.mean((arrays["labels"].astype(np.float64) - 1.0) ** 2)
  # Var((U1+U2-1)^2) = 1/15 - 1/36, so the standard error is 0.197/sqrt(N) = 0.0014.
  assert abs(mse - 1 / 6) < 5 * math.sqrt(1 / 15 - 1 / 36) / math.sqrt(20_000)
  assert info.extras["baseline_mse"] == pytest.approx(0.1667, abs=1e-4)


def test_synthetic_splits_are_deterministic_and_distinct():
  a, _ = data.load("adding", "train", **SMALL_ADDING)
  data.clear_caches()
  b, _ = data.load("adding", "train", **SMALL_ADDING)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  c, _ = data.load("adding", "test", **SMALL_ADDING)
  assert not np.isin(c["inputs"][..., 0], a["inputs"][..., 0]).any()
  d, _ = data.load("adding", "train", **{**SMALL_ADDING, "seed": 1})
  assert not np.array_equal(a["inputs"], d["inputs"])


def test_copy_task_structure():
  t = SMALL_COPY["delay"]
  arrays, info = data.load("copy", "validation", **SMALL_COPY)
  check_arrays(arrays, info, "validation", 20)
  assert (info.task, info.input_kind, info.input_dim, info.seq_len) == ("tagging", "tokens", 10,
                                                                       t + 20)
  x, y = arrays["inputs"], arrays["labels"]
  symbols = x[:, :10]
  assert ((0 <= symbols) & (symbols < 8)).all()
  np.testing.assert_array_equal(x[:, 10:t + 9], 8)  # T-1 blanks
  np.testing.assert_array_equal(x[:, t + 9], 9)  # delimiter
  np.testing.assert_array_equal(x[:, t + 10:], 8)  # blanks while recalling
  np.testing.assert_array_equal(y[:, :t + 10], 8)
  np.testing.assert_array_equal(y[:, t + 10:], symbols)
  assert info.extras["baseline_xent"] == pytest.approx(10 * math.log(8) / (t + 20))


def test_synthetic_sets_do_not_import_tensorflow():
  # The GPU image has no TensorFlow: its training check builds the adding config and data.
  code = ("import sys; from gru_jax import data; data.load('copy', 'train', num_train=2); "
          "data.load('adding', 'test', num_test=2); "
          "from experiments.configs import adding, copy, number_words; "
          "[m.get_config() for m in (adding, copy, number_words)]; "
          "assert not {'tensorflow', 'tensorflow_datasets'} & set(sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call,words", [
    (lambda: data.load("nope", "train"), ["unknown dataset", "sequential_digits", "adding"]),
    (lambda: data.load("adding", "dev"), ["unknown split", "validation"]),
    (lambda: data.load("adding", "train", window=3), ["unknown option", "window", "seq_len="]),
    (lambda: data.load("adding", "train", seq_len=1), ["seq_len", ">= 2"]),
    (lambda: data.load("copy", "train", delay=0), ["delay"]),
    (lambda: data.load("copy", "train", num_train=2.5), ["num_train"]),
    (lambda: data.load("sequential_digits", "train", pixels="cols"), ["pixels", "rows"]),
    (lambda: data.load("sunspots", "train", window=216), ["window", "216"]),
])
def test_bad_requests_raise_clear_errors(call, words):
  with pytest.raises(ValueError) as e:
    call()
  for w in words:
    assert w in str(e.value)


# ---------------------------------------------------------------- batches

def toy(n=23, t=6):
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, t + 1, size=n)
  return {"inputs": rng.normal(size=(n, t, 2)).astype(np.float32),
          "labels": np.arange(n, dtype=np.int32),  # the example's own index
          "mask": np.arange(t)[None, :] < lengths[:, None]}


def collect(*args, **kw):
  return list(data.batches(*args, **kw))


def test_batches_are_deterministic_per_seed_and_epoch():
  arrays = toy()
  kw = dict(seed=3, shuffle=True, drop_remainder=False)
  a = collect(arrays, 4, epoch=1, **kw)
  b = collect(arrays, 4, epoch=1, **kw)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])

  def order(**changes):
    out = collect(arrays, 4, **{**kw, "epoch": 1, **changes})
    return np.concatenate([x["labels"] for x in out])

  first, other_epoch, other_seed = order(), order(epoch=2), order(seed=4)
  assert not np.array_equal(first, other_epoch) and not np.array_equal(first, other_seed)


@pytest.mark.parametrize("bucket", [False, True])
def test_every_example_once_per_epoch_and_padding_has_weight_zero(bucket):
  arrays = toy(n=23)
  out = collect(arrays, 5, seed=0, epoch=0, shuffle=True, drop_remainder=False,
                bucket_by_length=bucket, bucket_window=2)
  assert len(out) == data.num_batches(23, 5, False) == 5
  for x in out:
    assert x["inputs"].shape == (5, 6, 2) and x["weight"].dtype == np.float32
    assert x["example_id"].dtype == np.int32
  weight = np.concatenate([x["weight"] for x in out])
  labels = np.concatenate([x["labels"] for x in out])
  np.testing.assert_array_equal(weight, [1] * 23 + [0] * 2)
  np.testing.assert_array_equal(np.sort(labels[weight == 1]), np.arange(23))
  np.testing.assert_array_equal(np.concatenate([x["example_id"] for x in out]), np.arange(25))
  pads = out[-1]
  assert pads["mask"][pads["weight"] == 0].any(axis=1).all()  # padding rows stay valid data
  # Rows carry their own example's data.
  for x in out:
    np.testing.assert_array_equal(x["inputs"], arrays["inputs"][x["labels"]])


def test_drop_remainder_and_no_shuffle():
  arrays = toy(n=23)
  out = collect(arrays, 5, seed=0, epoch=0, shuffle=False, drop_remainder=True)
  assert len(out) == data.num_batches(23, 5, True) == 4
  np.testing.assert_array_equal(np.concatenate([x["labels"] for x in out]), np.arange(20))
  assert all(x["weight"].all() for x in out)


def test_start_batch_resumes_exactly():
  arrays = toy(n=23)
  kw = dict(seed=1, epoch=4, shuffle=True, drop_remainder=False)
  full = collect(arrays, 4, **kw)
  resumed = collect(arrays, 4, start_batch=3, **kw)
  assert len(resumed) == len(full) - 3
  for x, y in zip(full[3:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert collect(arrays, 4, start_batch=len(full), **kw) == []


@pytest.mark.parametrize("bucket", [False, True])
def test_process_slices_concatenate_to_the_global_batch(bucket):
  arrays = toy(n=23)
  kw = dict(seed=2, epoch=0, shuffle=True, drop_remainder=False, bucket_by_length=bucket,
            trim_to_multiple=2 if bucket else None)
  whole = collect(arrays, 6, **kw)
  parts = [collect(arrays, 6, process_index=i, process_count=2, **kw) for i in range(2)]
  for k, w in enumerate(whole):
    for key in w:
      assert parts[0][k][key].shape[0] == 3
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), w[key])


def test_bucketing_reduces_padding_and_trimming_keeps_real_steps():
  rng = np.random.default_rng(1)
  n, t = 400, 50
  lengths = rng.integers(1, t + 1, size=n)
  arrays = {"inputs": np.zeros((n, t), np.int32), "labels": np.arange(n, dtype=np.int32),
            "mask": np.arange(t)[None, :] < lengths[:, None]}
  kw = dict(seed=0, epoch=0, shuffle=True, drop_remainder=True, trim_to_multiple=5)

  def padded_steps(bucket):
    out = collect(arrays, 16, bucket_by_length=bucket, **kw)
    for x in out:
      assert x["inputs"].shape[1] % 5 == 0 or x["inputs"].shape[1] == t
      # Trimming drops only padding: every real step is kept.
      np.testing.assert_array_equal(x["mask"].sum(1), lengths[x["labels"]])
    return sum(x["mask"].size - x["mask"].sum() for x in out)

  assert padded_steps(True) < 0.3 * padded_steps(False)


@pytest.mark.parametrize("kwargs,words", [
    (dict(batch_size=6, process_count=4), ["batch_size (6)", "process_count (4)"]),
    (dict(batch_size=4, process_index=2, process_count=2), ["process_index"]),
    (dict(batch_size=0), ["batch_size"]),
    (dict(batch_size=4, start_batch=99), ["start_batch", "[0, 6]"]),
    (dict(batch_size=4, epoch=-1), ["epoch"]),
])
def test_batches_bad_arguments_raise_at_call(kwargs, words):
  kw = dict(seed=0, epoch=0, shuffle=True, drop_remainder=False)
  kw.update(kwargs)
  b = kw.pop("batch_size")
  with pytest.raises(ValueError) as e:
    data.batches(toy(), b, **kw)  # no next(): errors come at the call
  for w in words:
    assert w in str(e.value)


def test_batches_rejects_mismatched_arrays():
  with pytest.raises(ValueError, match="leading size N"):
    data.batches({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0, epoch=0, shuffle=False,
                 drop_remainder=False)
  with pytest.raises(ValueError, match="mask"):
    data.batches({"a": np.zeros(3)}, 2, seed=0, epoch=0, shuffle=False, drop_remainder=False,
                 bucket_by_length=True)


@pytest.mark.parametrize("value", ["no", "", 0, 1, None, np.array([True])])
@pytest.mark.parametrize("flag", ["shuffle", "drop_remainder", "bucket_by_length"])
def test_batches_flags_refuse_non_bools(flag, value):
  # shuffle="no" used to shuffle: any truthy value switched a flag on.
  kw = dict(seed=0, epoch=0, shuffle=False, drop_remainder=False)
  kw[flag] = value
  with pytest.raises(ValueError) as e:
    data.batches(toy(), 4, **kw)  # at the call, before any next()
  assert f"{flag} must be a bool" in str(e.value) and repr(value) in str(e.value)


def test_flags_refuse_non_bools_in_epoch_order_num_batches_and_sharded_batches():
  with pytest.raises(ValueError, match="shuffle must be a bool.*'no'"):
    data.epoch_order(10, 2, seed=0, epoch=0, shuffle="no")
  with pytest.raises(ValueError, match="drop_remainder must be a bool.*got 1"):
    data.num_batches(23, 5, 1)
  with pytest.raises(ValueError, match="shuffle must be a bool.*'no'"):
    data.sharded_batches(_shards(), 8, num_shards=4, seed=0, epoch=0, shuffle="no",
                         num_batches=1)


def test_batches_take_numpy_bools_as_python_bools():
  arrays, kw = toy(n=23), dict(seed=3, epoch=1)
  for flag in (False, True):
    py = collect(arrays, 5, shuffle=flag, drop_remainder=flag, bucket_by_length=flag, **kw)
    npy = collect(arrays, 5, shuffle=np.bool_(flag), drop_remainder=np.bool_(flag),
                  bucket_by_length=np.bool_(flag), **kw)
    assert len(py) == len(npy) == (4 if flag else 5)  # floor / ceil of 23 / 5
    for x, y in zip(py, npy):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  # Not shuffled, remainder dropped: the first 20 examples in array order.
  plain = collect(arrays, 5, shuffle=np.False_, drop_remainder=np.True_, **kw)
  np.testing.assert_array_equal(np.concatenate([x["labels"] for x in plain]), np.arange(20))
  assert data.num_batches(23, 5, np.True_) == 4 and data.num_batches(23, 5, np.False_) == 5


# ---------------------------------------------------------------- public TFDS sets, mocked

@pytest.fixture
def mock_tfds(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path / "meta")):
    yield str(tmp_path / "data")


def raw_tfds(name, split, data_dir):
  import tensorflow_datasets as tfds
  return list(tfds.as_numpy(tfds.builder(name, data_dir=data_dir).as_dataset(split=split)))


def test_mnist_sequential_and_permuted(mock_tfds):
  plain, info = data.load("mnist", "test", data_dir=mock_tfds)
  assert (info.seq_len, info.input_dim, info.num_classes) == (784, 1, 10)
  check_arrays(plain, info, "test", 24)
  assert info.num_examples == {"train": 22, "validation": 2, "test": 24}  # 1/12 held out
  raw = raw_tfds("mnist", "test", mock_tfds)
  np.testing.assert_array_equal(plain["inputs"][..., 0] * 255,
                                np.stack([r["image"].reshape(784) for r in raw]))
  assert plain["mask"].all() and 0 <= plain["inputs"].min() and plain["inputs"].max() <= 1
  permuted, pinfo = data.load("mnist", "test", permuted=True, data_dir=mock_tfds)
  perm = pinfo.extras["permutation"]
  np.testing.assert_array_equal(np.sort(perm), np.arange(784))
  assert not np.array_equal(perm, np.arange(784))
  np.testing.assert_array_equal(permuted["inputs"], plain["inputs"][:, perm])
  train, _ = data.load("mnist", "train", data_dir=mock_tfds)
  val, _ = data.load("mnist", "validation", data_dir=mock_tfds)
  assert (len(train["labels"]), len(val["labels"])) == (22, 2)
  rows = {r.tobytes() for r in train["inputs"]}
  assert not any(r.tobytes() in rows for r in val["inputs"])  # disjoint


def test_imdb_tokens_masks_and_truncation(mock_tfds):
  from gru_jax.data.public import tokenize
  arrays, info = data.load("imdb_reviews", "test", vocab_size=6, max_len=3, data_dir=mock_tfds)
  check_arrays(arrays, info, "test", 24)
  assert (info.task, info.input_kind, info.num_classes, info.input_dim) == (
      "classification", "tokens", 2, 6)
  vocab = info.extras["vocab"]
  assert vocab[:2] == ["<pad>", "<unk>"]
  mask, ids = arrays["mask"], arrays["inputs"]
  lengths = mask.sum(1)
  np.testing.assert_array_equal(mask, np.arange(3)[None] < lengths[:, None])  # prefix masks
  assert (ids[~mask] == 0).all() and (ids[mask] != 0).all()
  for row, r in enumerate(raw_tfds("imdb_reviews", "test", mock_tfds)):
    words = tokenize(r["text"])[-3:] or ["<unk>"]
    assert lengths[row] == len(words)
    want = [w if w in vocab else "<unk>" for w in words]
    assert [vocab[i] for i in ids[row, :lengths[row]]] == want
    assert arrays["labels"][row] == r["label"]
  assert tokenize(b"A <br />Great film!! Isn't it?") == ["a", "great", "film", "!", "!", "isn't",
                                                        "it", "?"]


def test_tiny_shakespeare_next_character_targets(mock_tfds):
  arrays, info = data.load("tiny_shakespeare", "validation", seq_len=8, data_dir=mock_tfds)
  text = "".join(r["text"].decode() for r in raw_tfds("tiny_shakespeare", "validation",
                                                       mock_tfds))
  n = (len(text) - 1) // 8
  check_arrays(arrays, info, "validation", n)
  assert info.task == "lm" and info.num_classes == info.input_dim == len(info.extras["vocab"])
  vocab = np.array(info.extras["vocab"])
  decoded = "".join(vocab[arrays["inputs"].reshape(-1)])
  assert decoded == text[:n * 8]
  assert "".join(vocab[arrays["labels"].reshape(-1)]) == text[1:n * 8 + 1]


# ---------------------------------------------------------------- reading in shards

def test_shard_bounds_partition_every_size():
  for n in (0, 1, 7, 1258):
    for count in (1, 2, 3, 8):
      bounds = [data.shard_bounds(n, i, count) for i in range(count)]
      assert bounds[0][0] == 0 and bounds[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
      assert max(h - l for l, h in bounds) - min(h - l for l, h in bounds) <= 1
  with pytest.raises(ValueError, match=r"shard index must be in \[0, 2\)"):
    data.shard_bounds(10, 2, 2)


def test_digits_shards_read_only_their_rows_and_partition_the_split(data_dir):
  full, info = data.load("sequential_digits", "train", data_dir=data_dir)
  assert data.reads_shards("sequential_digits")
  parts = [data.load("sequential_digits", "train", shard=(i, 3), data_dir=data_dir)
           for i in range(3)]
  ids = [p[1].extras["sklearn_index"] for p in parts]
  assert [len(i) for i in ids] == [h - l for l, h in (data.shard_bounds(1258, i, 3)
                                                      for i in range(3))]
  allid = np.concatenate(ids)
  assert len(set(allid)) == len(allid) == 1258  # disjoint
  assert set(allid) == set(info.extras["sklearn_index"])  # and together the whole split
  # Each shard's rows are the full split's rows with those sklearn indices.
  where = {k: j for j, k in enumerate(info.extras["sklearn_index"])}
  for (arrays, pinfo) in parts:
    rows = [where[k] for k in pinfo.extras["sklearn_index"]]
    np.testing.assert_array_equal(arrays["inputs"], full["inputs"][rows])
    np.testing.assert_array_equal(arrays["labels"], full["labels"][rows])
    assert pinfo.num_examples == info.num_examples  # sizes stay those of the whole splits
  assert parts[1][1].extras["shard"] == [1, 3]
  # More shards than rows (2000 > 1258): shard 0 is empty, shard 1 holds one row.
  empty, einfo = data.load("sequential_digits", "train", shard=(0, 2000), data_dir=data_dir)
  one, oinfo = data.load("sequential_digits", "train", shard=(1, 2000), data_dir=data_dir)
  assert data.shard_bounds(1258, 0, 2000) == (0, 0) and data.shard_bounds(1258, 1, 2000) == (0, 1)
  for k in full:
    assert empty[k].shape == (0, *full[k].shape[1:]) and empty[k].dtype == full[k].dtype
  assert len(einfo.extras["sklearn_index"]) == 0
  row = where[oinfo.extras["sklearn_index"][0]]
  np.testing.assert_array_equal(one["inputs"], full["inputs"][row:row + 1])
  with pytest.raises(ValueError, match="shard must be"):
    data.load("sequential_digits", "train", shard=2, data_dir=data_dir)


def test_generated_data_shards_are_slices_of_the_split():
  assert not data.reads_shards("adding")
  full, _ = data.load("adding", "test", seq_len=20)
  parts = [data.load("adding", "test", shard=(i, 4), seq_len=20)[0] for i in range(4)]
  for k in full:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_mnist_shards_read_tfds_slices_and_partition_train_and_test(mock_tfds, monkeypatch):
  """Each shard asks TFDS only for its row range; our train/validation holdout is
  applied within it.  Mocked TFDS draws fresh examples for every slice string,
  so the reader here slices one mocked read of the whole split instead."""
  from gru_jax.data import public, tfds_io
  real = tfds_io.read_split
  whole = {}
  asked = []

  def sliced_reader(builder, split, shard=None):
    base, _, rest = split.partition("[")
    if base not in whole:
      whole[base] = real(builder, base)
    lo, hi = (tfds_io.shard_rows(builder, base, shard) if shard else
              tuple(int(v) for v in rest.rstrip("]").split(":")) if rest else (0, None))
    asked.append((base, lo, hi))
    return {k: v[lo:hi] for k, v in whole[base].items()}

  monkeypatch.setattr(public.tfds_io, "read_split", sliced_reader)
  monkeypatch.setattr(public, "_read", lambda name, split, data_dir: sliced_reader(
      public._builder(name, data_dir), split))
  for split in ("train", "validation", "test"):
    full, _ = data.load("mnist", split, data_dir=mock_tfds)
    asked.clear()
    parts = [data.load("mnist", split, shard=(i, 3), data_dir=mock_tfds)[0] for i in range(3)]
    # 24 mocked rows per split; whole reads happen only to count rows (mocked splits
    # have no recorded size) and to find the holdout.
    assert [a[1:] for a in asked if a[2] is not None] == [(0, 8), (8, 16), (16, 24)]
    for k in full:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    # More shards than rows: the empty shards are empty arrays of the right dtypes, and the
    # shards still partition our splits (the holdout within each TFDS row range).  Reading
    # an empty range from real TFDS files is tested with the digits above.
    parts = [data.load("mnist", split, shard=(i, 30), data_dir=mock_tfds)[0] for i in range(30)]
    assert sum(len(p["labels"]) == 0 for p in parts) >= 6
    for k in full:
      assert all(p[k].dtype == full[k].dtype and p[k].shape[1:] == full[k].shape[1:]
                 for p in parts)
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def _shards(n=40, s=4, t=3):
  arrays = {"inputs": np.arange(n * t, dtype=np.float32).reshape(n, t, 1),
            "labels": np.arange(n) % 5}
  return {i: {k: v[slice(*data.shard_bounds(n, i, s))] for k, v in arrays.items()}
          for i in range(s)}


def test_sharded_batches_do_not_depend_on_how_processes_split_the_shards():
  shards = _shards()
  kw = dict(num_shards=4, seed=3, epoch=2, shuffle=True, num_batches=2)
  one = list(data.sharded_batches(shards, 8, **kw))
  halves = [list(data.sharded_batches({i: shards[i] for i in ids}, 8, **kw))
            for ids in ((0, 1), (2, 3))]
  quarters = [list(data.sharded_batches({i: shards[i]}, 8, **kw)) for i in range(4)]
  assert len(one) == 2
  for k, batch in enumerate(one):
    for split in (halves, quarters):
      for key in batch:
        np.testing.assert_array_equal(np.concatenate([p[k][key] for p in split]), batch[key])
    np.testing.assert_array_equal(batch["example_id"], k * 8 + np.arange(8))
    assert batch["weight"].tolist() == [1.0] * 8
    # Rows 2s, 2s+1 come from shard s, in that shard's own shuffled order.
    for s in range(4):
      assert set(batch["labels"][2 * s:2 * s + 2]) <= set(shards[s]["labels"])
  # Independent reconstruction from epoch_order: global batch k holds rows
  # k*2..k*2+1 of shard s's own order, drawn from (seed, epoch, stream s+1).
  for k, batch in enumerate(one):
    want = np.concatenate([
        shards[s]["inputs"][data.epoch_order(10, 2, seed=3, epoch=2, shuffle=True,
                                             stream=s + 1)[2 * k:2 * k + 2]]
        for s in range(4)])
    np.testing.assert_array_equal(batch["inputs"], want)
  # Each shard's epoch order is its own draw from (seed, epoch, shard).
  firsts = [one[0]["inputs"][2 * s, 0, 0] - shards[s]["inputs"][0, 0, 0] for s in range(4)]
  assert len(set(firsts)) > 1
  # Resume mid-epoch and a different epoch.
  np.testing.assert_array_equal(
      next(data.sharded_batches(shards, 8, **dict(kw, start_batch=1)))["inputs"], one[1]["inputs"])
  other = next(data.sharded_batches(shards, 8, **dict(kw, epoch=3)))
  assert not np.array_equal(other["inputs"], one[0]["inputs"])


def test_sharded_batches_reject_bad_arguments():
  shards = _shards()
  kw = dict(num_shards=4, seed=0, epoch=0, shuffle=True)
  with pytest.raises(ValueError, match="divisible by num_shards"):
    data.sharded_batches(shards, 6, num_batches=1, **kw)
  with pytest.raises(ValueError, match="contiguous"):
    data.sharded_batches({0: shards[0], 2: shards[2]}, 8, num_batches=1, **kw)
  with pytest.raises(ValueError, match="exceeds shard 0's 5 batches"):
    data.sharded_batches(shards, 8, num_batches=6, **kw)
  with pytest.raises(ValueError, match="start_batch"):
    data.sharded_batches(shards, 8, num_batches=2, start_batch=3, **kw)


def test_trimming_keeps_every_valid_step_of_left_padded_and_holey_masks():
  mask = np.array([[0, 0, 0, 1, 1, 1, 0, 0],     # left padding
                   [1, 0, 0, 0, 1, 0, 0, 0],     # a hole
                   [1, 1, 0, 0, 0, 0, 0, 0]], bool)
  inputs = np.arange(24).reshape(3, 8)
  b = next(data.batches({"inputs": inputs, "mask": mask}, 3, seed=0, epoch=0, shuffle=False,
                        drop_remainder=True, trim_to_multiple=1))
  # The last valid step of the batch is step 5: steps 0-5 stay, 6-7 (all padding) go.
  np.testing.assert_array_equal(b["mask"], mask[:, :6])
  np.testing.assert_array_equal(b["inputs"], inputs[:, :6])


def test_trimming_keeps_the_valid_steps_of_padding_rows_too():
  # Padding rows copy examples from the epoch's start; cut to the real rows' last valid
  # step, a left-padded copy lost every valid step (an empty mask row, which `batches`
  # promises never to give: a masked mean over it is 0/0).
  mask = np.zeros((5, 8), bool)
  for row, end in enumerate([8, 8, 2, 2, 2]):
    mask[row, end - 1] = True  # one valid step, at the row's end
  inputs = np.arange(40).reshape(5, 8)
  last = collect({"inputs": inputs, "mask": mask}, 4, seed=0, epoch=0, shuffle=False,
                 drop_remainder=False, trim_to_multiple=1)[-1]
  np.testing.assert_array_equal(last["weight"], [1, 0, 0, 0])
  rows = [4, 0, 1, 2]  # example 4, then cyclic copies of examples 0, 1, 2
  t = last["mask"].shape[1]
  np.testing.assert_array_equal(last["mask"], mask[rows, :t])
  assert last["mask"].any(axis=1).all()
  assert mask[rows, t:].sum() == 0  # nothing valid was cut


@pytest.mark.parametrize("n,b,p", [(1, 1, 1), (1, 4, 2), (3, 8, 4), (5, 8, 8), (7, 2, 2),
                                   (17, 6, 3), (0, 4, 2)])
@pytest.mark.parametrize("bucket", [False, True])
def test_processes_see_every_example_once_and_resume_anywhere(n, b, p, bucket):
  """Edge sizes (a batch larger than the split, one example, more processes than
  examples, an empty split): the processes' real rows over an epoch are range(N), each
  once; resuming at any batch gives the rest of the uninterrupted run."""
  arrays = toy(n=n) if n else {k: v[:0] for k, v in toy(n=1).items()}
  kw = dict(seed=5, epoch=2, shuffle=True, drop_remainder=False, bucket_by_length=bucket,
            bucket_window=2)
  runs = [collect(arrays, b, process_index=i, process_count=p, **kw) for i in range(p)]
  assert all(len(r) == -(-n // b) for r in runs)
  seen = [x["labels"][x["weight"] == 1] for r in runs for x in r]
  np.testing.assert_array_equal(np.sort(np.concatenate(seen or [np.zeros(0, int)])),
                                np.arange(n))
  for i, r in enumerate(runs):
    for start in range(len(r) + 1):
      rest = collect(arrays, b, process_index=i, process_count=p, start_batch=start, **kw)
      assert len(rest) == len(r) - start
      for x, y in zip(rest, r[start:]):
        for key in x:
          np.testing.assert_array_equal(x[key], y[key])


def test_epoch_order_stream_error_names_the_allowed_values():
  with pytest.raises(ValueError, match=r"stream must be an int >= 0, got -1"):
    data.epoch_order(4, 2, seed=0, epoch=0, shuffle=True, stream=-1)
  a = data.epoch_order(50, 5, seed=0, epoch=0, shuffle=True, stream=0)
  np.testing.assert_array_equal(a, np.random.default_rng([0, 0]).permutation(50))
  b = data.epoch_order(50, 5, seed=0, epoch=0, shuffle=True, stream=np.int64(2))
  np.testing.assert_array_equal(b, np.random.default_rng([0, 0, 2]).permutation(50))


def test_public_sets_load_when_first_imported_inside_mock_data(tmp_path):
  # tfds_io used to keep the download_and_prepare it saw at import as "the real one": first
  # imported inside mock_data, it took the stand-in for TFDS's own, probed the network and
  # failed offline (this file's mnist test failed when run alone).
  code = ("import sys, tensorflow_datasets as tfds\n"
          "from gru_jax import data\n"
          "assert 'gru_jax.data.tfds_io' not in sys.modules\n"
          f"with tfds.testing.mock_data(num_examples=6, data_dir={str(tmp_path / 'm')!r}):\n"
          f"  a, info = data.load('mnist', 'test', data_dir={str(tmp_path / 'd')!r})\n"
          "print(a['inputs'].shape, info.num_examples['test'])\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split("\n")[-2] == "(6, 784, 1) 6"


def test_trimming_leaves_a_seq2seq_target_side_of_the_source_length_alone():
  # With targets as long as the sources (L == T), the target arrays matched the mask's
  # [N,T] and were cut to the sources' length: labels silently lost.
  rng = np.random.default_rng(0)
  n, t = 6, 10
  src_len = rng.integers(1, 4, n)
  arrays = {"inputs": rng.integers(3, 9, (n, t)).astype(np.int32),
            "mask": np.arange(t)[None] < src_len[:, None],
            "decoder_inputs": rng.integers(3, 9, (n, t)).astype(np.int32),
            "labels": rng.integers(3, 9, (n, t)).astype(np.int32),
            "label_mask": np.ones((n, t), bool)}
  for b in collect(arrays, 3, seed=0, epoch=0, shuffle=False, drop_remainder=True,
                   trim_to_multiple=1):
    rows = b["example_id"]
    keep = src_len[rows].max()
    np.testing.assert_array_equal(b["inputs"], arrays["inputs"][rows, :keep])
    np.testing.assert_array_equal(b["mask"], arrays["mask"][rows, :keep])
    for k in ("decoder_inputs", "labels", "label_mask"):
      np.testing.assert_array_equal(b[k], arrays[k][rows])
