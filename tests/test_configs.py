"""A few steps of every shipped config, in process, on small data (public sets mocked)."""
import glob
import importlib.util
import math
import os

import pytest

from gru_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments",
                                                                           "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "base")))
PUBLIC = {"mnist", "imdb", "shakespeare"}
SMALL_DATA = {"adding": dict(seq_len=12, num_train=64, num_validation=16, num_test=16),
              "copy": dict(delay=5, num_train=64, num_validation=16, num_test=16),
              "number_words": dict(num_train=64, num_validation=16, num_test=16),
              "reversal": dict(max_len=12, num_train=64, num_validation=16, num_test=16),
              "python_docs": dict(seq_len=200),
              "imdb": dict(vocab_size=50, max_len=30), "shakespeare": dict(seq_len=20)}


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", "configs",
                                                                    f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_every_config_is_covered():
  assert {"digits", "keras_faithful", "adding", "copy", "sunspots", "mnist", "imdb",
          "shakespeare", "number_words", "python_docs", "reversal"} <= set(CONFIGS)


# The fast loop (-m "not slow") keeps the main job, regression, a synthetic task,
# the Keras recipe and one mocked public set; CI runs every config.
FAST_CONFIGS = {"digits", "sunspots", "copy", "keras_faithful", "mnist"}


@pytest.mark.parametrize("name", [n if n in FAST_CONFIGS else
                                  pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS])
def test_config_trains_a_few_steps(name, tmp_path, request):
  c = load_config(name)
  assert c.get_type("seed") is int  # every config has the base keys
  for key in ("batch_size", "num_epochs", "num_train_steps", "learning_rate", "eval_every_steps",
              "checkpoint_every_steps", "model", "dataset"):
    assert key in c
  doc = importlib.util.spec_from_file_location(name, os.path.join(
      ROOT, "experiments", "configs", f"{name}.py"))
  assert "python -m experiments.train" in open(doc.origin).read()
  # Every option of the dataset is a config key, so the command line can set each one.
  from gru_jax import data
  assert set(c.dataset) == {"name"} | set(data.options(c.dataset.name))
  c.num_train_steps = 3
  c.eval_every_steps = 3
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, 3)  # longer than the run: refused
  c.batch_size = 8
  c.bn_recalibrate_batches = min(c.bn_recalibrate_batches, 1)
  c.model.hidden_sizes = tuple(8 for _ in c.model.hidden_sizes)
  c.remat = min(c.remat, 7)
  c.dataset.update(SMALL_DATA.get(name, {}))
  if name in PUBLIC:
    import tensorflow_datasets as tfds
    ctx = tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path / "meta"))
    c.dataset.data_dir = str(tmp_path / "data")
  else:
    import contextlib
    ctx = contextlib.nullcontext()
  with ctx:
    results = train.train_and_evaluate(c, str(tmp_path / "wd"))
  for split in c.eval_splits:
    assert math.isfinite(results[split]["loss"])
    assert ("rmse" in results[split]) == (c.dataset.name in ("adding", "sunspots"))


def test_shakespeare_train_then_sample(tmp_path, caplog):
  """The LM path end to end: train on mocked text, then sample from the workdir."""
  import tensorflow_datasets as tfds
  from experiments import sample
  c = load_config("shakespeare")
  c.num_train_steps, c.batch_size = 2, 4
  c.model.hidden_sizes = (8,)
  c.dataset.update(seq_len=20, data_dir=str(tmp_path / "data"))
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path / "meta")):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
    _, _, _, info = train.restore_for_inference(str(tmp_path / "wd"))
    text = sample.sample_text(str(tmp_path / "wd"), "ab", 15, 1.0, 0)
    # top_k=1 is greedy: the same text for any seed and temperature.
    greedy = [sample.sample_text(str(tmp_path / "wd"), "ab", 15, t, seed, top_k=1)
              for t, seed in ((1.0, 0), (3.0, 1))]
    # Beam search (against exhaustive search in test_beam_search) draws nothing: the
    # same text for any seed and temperature.
    beams = [sample.sample_text(str(tmp_path / "wd"), "ab", 15, t, seed, beam_size=3)
             for t, seed in ((1.0, 0), (3.0, 1))]
  assert text.startswith("ab") and len(text) == 17
  assert greedy[0] == greedy[1] and greedy[0].startswith("ab") and len(greedy[0]) == 17
  assert beams[0] == beams[1] and len(beams[0]) == 17 and beams[0].startswith("ab")
  assert set(beams[0]) <= set(info.extras["vocab"])
  assert set(text[2:]) <= set(info.extras["vocab"])
  # Prompt characters outside the vocabulary are named (the model reads them as unknown).
  odd = "\u2603\u2604"
  assert not set(odd) & set(info.extras["vocab"])
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path / "meta")):
    with caplog.at_level("WARNING"):
      sample.sample_text(str(tmp_path / "wd"), "a" + odd, 3, 1.0, 0)
  warned = [r.getMessage() for r in caplog.records if "not in the model's vocabulary" in r.getMessage()]
  assert len(warned) == 1 and repr(sorted(odd)) in warned[0]
  with pytest.raises(ValueError, match="no config.json"):
    train.restore_for_inference(str(tmp_path))


@pytest.mark.slow
def test_python_docs_lm_beats_the_bigram_model_then_samples(tmp_path):
  """A short run on Python's own docs predicts held-out text better than the
  Witten-Bell bigram trained on the same text, then generates from its workdir."""
  from experiments import sample
  from gru_jax import data
  c = load_config("python_docs")
  c.num_train_steps = c.eval_every_steps = 150
  c.batch_size, c.learning_rate = 32, 1e-2
  c.optimizer.warmup_steps = 10
  c.model.hidden_sizes, c.model.dropout = (64,), 0.0
  c.eval_splits = ("test",)
  c.dataset.update(seq_len=50, data_dir=str(tmp_path / "data"))
  results = train.train_and_evaluate(c, str(tmp_path / "wd"))
  bigram = data.python_docs_baselines(seq_len=50, order=2, data_dir=str(tmp_path / "data"))
  assert results["test"]["bits_per_char"] < bigram["order_2_bpc"]
  assert results["test"]["bits_per_char"] == pytest.approx(results["test"]["loss"] / math.log(2))
  text = sample.sample_text(str(tmp_path / "wd"), "The ", 40, 0.5, 0)
  _, _, _, info = train.restore_for_inference(str(tmp_path / "wd"))
  assert text.startswith("The ") and len(text) == 44 and set(text) <= set(info.extras["vocab"])
