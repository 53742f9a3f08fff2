"""Trainer pieces: metrics, class weights, optimisers, steps, config checks, recalibration."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, recall_score
from sklearn.utils.class_weight import compute_class_weight

from experiments.configs import base
from gru_jax import models, train
from gru_jax.cell import GRUParams
from tests import reference


def test_class_weights_match_sklearn():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
  ours = train.class_weights(labels, 3)
  ref = compute_class_weight("balanced", classes=np.arange(3), y=labels)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  assert train.class_weights(np.array([0, 0, 2]), 3)[1] == 0  # unseen class


def test_summarize_matches_sklearn_metrics():
  rs = np.random.RandomState(0)
  y, p = rs.randint(0, 4, 200), rs.randint(0, 4, 200)
  p[:100] = y[:100]
  cm = np.zeros((4, 4))
  np.add.at(cm, (y, p), 1)
  out = train.summarize({"loss": 50.0, "count": 200.0, "confusion": cm}, "classification")
  assert out["loss"] == 0.25
  assert out["accuracy"] == pytest.approx((y == p).mean())
  assert out["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
  np.testing.assert_allclose(out["per_class_recall"], recall_score(y, p, average=None))
  np.testing.assert_array_equal(out["confusion_matrix"], confusion_matrix(y, p))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # the point here
def test_macro_f1_counts_predicted_classes_absent_from_the_split():
  """A class the model predicts but the split lacks scores F1 = 0 in sklearn's macro average
  (it was left out, which raised macro-F1 from 0.489 to 0.733 here); a class neither true
  nor predicted stays out."""
  y = np.array([0, 0, 1, 1, 1, 0])
  p = np.array([0, 2, 1, 1, 0, 0])
  cm = np.zeros((4, 4))
  np.add.at(cm, (y, p), 1)
  out = train.summarize({"loss": 0.0, "count": 6.0, "confusion": cm}, "classification")
  assert out["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
  assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
  assert out["per_class_recall"][2:] == [None, None]


def test_eval_step_sums_ignore_padding():
  m = models.SequenceModel("classification", 3, hidden_sizes=(4,), batch_norm=False, dropout=0.0)
  x = jax.random.normal(jax.random.key(0), (5, 6, 2))
  v = m.init(jax.random.key(1), x)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=v["params"], opt_state=(),
                           batch_stats={})
  labels = jnp.array([0, 1, 2, 1, 0])
  batch = {"inputs": x, "mask": jnp.ones((5, 6), bool), "labels": labels,
           "weight": jnp.array([1, 1, 1, 0, 0], jnp.float32)}
  sums = train.eval_step(state, batch, model=m, num_classes=3)
  logits = np.asarray(m.apply(v, x), np.float64)[:3]
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(sums["loss"], -logp[np.arange(3), labels[:3]].sum(), rtol=1e-5)
  assert float(sums["count"]) == 3
  assert float(np.asarray(sums["confusion"]).sum()) == 3


def test_tagging_loss_uses_step_mask_and_class_weights():
  out = jnp.log(jnp.array([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]]))
  batch = {"labels": jnp.array([[0, 1, 1]]), "mask": jnp.array([[True, True, False]]),
           "weight": jnp.ones(1)}
  loss, w, pred, _ = train._per_example_terms("tagging", out, batch, jnp.array([1.0, 3.0]))
  np.testing.assert_allclose(np.asarray(loss[:2]), [-np.log(0.7), -np.log(0.8)], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(w), [1.0, 3.0, 0.0])
  np.testing.assert_array_equal(np.asarray(pred), [0, 1, 0])


def _cfg(**opt):
  c = base.get_base_config()
  c.optimizer.update(opt)
  return c


def test_optimizers_match_optax_references():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([10.0, 0.0, -20.0])}

  def one_step(tx):
    upd, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, upd)["w"]

  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4))
  np.testing.assert_allclose(one_step(train.create_optimizer(
      _cfg(name="adamw", clip_norm=1.0), 100)), one_step(ref), rtol=1e-6)
  # Adam's first step moves each parameter by lr·sign(g) (bias-corrected moments).
  np.testing.assert_allclose(one_step(train.create_optimizer(_cfg(), 100)),
                             [1.0 - 1e-3, -2.0, 3.0 + 1e-3], rtol=1e-6)
  # Warmup starts at learning rate 0: the first update leaves the parameters unchanged,
  # and the second moves them by lr(1) = 1e-3 / 10 per Adam's sign rule.
  warm = train.create_optimizer(_cfg(schedule="warmup_cosine", warmup_steps=10), 100)
  state = warm.init(params)
  upd, state = warm.update(grads, state, params)
  np.testing.assert_allclose(optax.apply_updates(params, upd)["w"], params["w"], atol=0)
  upd, _ = warm.update(grads, state, params)
  np.testing.assert_allclose(optax.apply_updates(params, upd)["w"], [1.0 - 1e-4, -2.0, 3.0 + 1e-4],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="optimizer.name must be"):
    train.create_optimizer(_cfg(name="sgd"), 10)
  with pytest.raises(ValueError, match="optimizer.schedule must be"):
    train.create_optimizer(_cfg(schedule="step"), 10)
  # A negative clip norm ("-1: off" elsewhere) made optax flip every gradient: refused.
  with pytest.raises(ValueError, match=r"optimizer.clip_norm must be a number >= 0 .*got -1.0"):
    train.create_optimizer(_cfg(clip_norm=-1.0), 10)
  with pytest.raises(ValueError, match=r"optimizer.warmup_steps must be an int >= 0, got -5"):
    train.create_optimizer(_cfg(schedule="warmup_cosine", warmup_steps=-5), 10)


def test_train_step_reduces_loss_on_fixed_batch():
  m = models.SequenceModel("classification", 2, hidden_sizes=(8,), dropout=0.1)
  x = jax.random.normal(jax.random.key(0), (16, 5, 3))
  labels = (x[:, :, 0].sum(1) > 0).astype(jnp.int32)
  batch = {"inputs": x, "mask": jnp.ones((16, 5), bool), "labels": labels,
           "weight": jnp.ones(16), "example_id": jnp.arange(16)}
  tx = optax.adam(1e-2)
  state = train.init_state(m, tx, jax.random.key(1), batch)
  step = jax.jit(lambda s, b: train.train_step(s, b, jax.random.key(2), model=m, tx=tx))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 30
  assert losses[-1] < 0.5 * losses[0]


def test_bf16_compute_keeps_float32_params_and_tracks_float32():
  kw = dict(task="classification", num_outputs=3, hidden_sizes=(16,), dropout=0.0)
  m32 = models.SequenceModel(**kw)
  m16 = models.SequenceModel(**kw, compute_dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (8, 12, 4))
  batch = {"inputs": x, "mask": jnp.ones((8, 12), bool), "labels": jnp.arange(8) % 3,
           "weight": jnp.ones(8), "example_id": jnp.arange(8)}
  tx = optax.adam(1e-2)
  state = train.init_state(m32, tx, jax.random.key(1), batch)
  v = {"params": state.params, "batch_stats": state.batch_stats}
  y32, y16 = m32.apply(v, x), m16.apply(v, x)
  assert float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32)) < 3e-2
  step = jax.jit(train.train_step, static_argnames=("model", "tx"))
  s16, _ = step(state, batch, jax.random.key(2), model=m16, tx=tx)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16.params))
  s32, _ = step(state, batch, jax.random.key(2), model=m32, tx=tx)
  # Adam's first step is lr·sign(g): bf16 gradients must agree in sign almost everywhere.
  d16 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, s16.params, state.params))
  d32 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, s32.params, state.params))
  agree = np.mean(np.concatenate([np.sign(a).ravel() == np.sign(b).ravel()
                                  for a, b in zip(d16, d32)]))
  assert agree > 0.9


def test_sharded_training_data_counts_and_errors(tmp_path, monkeypatch):
  """config.data_shards: steps per epoch from the smallest shard, class counts over
  the whole split, and clear errors for shard counts the run cannot use."""
  from experiments.configs import digits
  from gru_jax import data
  monkeypatch.setenv("GRU_JAX_DATA_DIR", str(tmp_path))
  cfg = digits.get_config()
  opts = {k: v for k, v in cfg.dataset.to_dict().items() if k != "name"}
  full, info = data.load("sequential_digits", "train", **opts)
  cfg.batch_size, cfg.data_shards = 32, 2
  td = train._TrainData(cfg, opts)
  assert td.steps_per_epoch == 629 // 16 and sorted(td.shards) == [0, 1]
  np.testing.assert_array_equal(td.class_counts(10), np.bincount(full["labels"], minlength=10))
  batch = next(td.batches(0, 0, cfg.seed))
  assert batch["inputs"].shape == (32, 8, 8)
  np.testing.assert_array_equal(batch["example_id"], np.arange(32))
  for shards, batch_size, bucket, msg in [(3, 32, False, "divisible by config.data_shards=3"),
                                          (-2, 32, False, "positive multiple"),
                                          (2, 32, True, "bucket_by_length"),
                                          (2, 2000, False, "exceeds the training examples")]:
    cfg.data_shards, cfg.batch_size, cfg.bucket_by_length = shards, batch_size, bucket
    with pytest.raises(ValueError, match=msg):
      train._TrainData(cfg, opts)


def _tiny_digits(steps=2):
  from tests.test_configs import load_config
  c = load_config("digits")
  c.num_train_steps, c.eval_every_steps, c.batch_size = steps, steps, 16
  c.model.hidden_sizes = (8, 8)
  c.bn_recalibrate_batches = 1
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps)  # longer is refused
  return c


@pytest.mark.parametrize("key,value,message", [
    ("log_every_steps", 0, "config.log_every_steps must be an int >= 1, got 0"),
    ("num_train_steps", -5, "config.num_train_steps must be an int >= 0, got -5"),
    ("checkpoint_every_steps", -1, "config.checkpoint_every_steps must be an int >= 0"),
    ("eval_every_steps", -2, "config.eval_every_steps must be an int >= 0"),
    ("compute_dtype", "bf16", "config.compute_dtype must be a floating-point dtype name .*'bf16'"),
    ("compute_dtype", "int8", "config.compute_dtype must be a floating-point dtype name .*'int8'"),
])
def test_bad_counts_are_refused_before_anything_runs(tmp_path, key, value, message):
  c = _tiny_digits()
  c[key] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  c = _tiny_digits()
  c.model.hidden_sizes = ()
  with pytest.raises(ValueError, match=r"hidden_sizes must be a non-empty tuple"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))


def test_refused_resume_leaves_the_workdir_as_it_was(tmp_path):
  wd = str(tmp_path / "wd")
  c = _tiny_digits()
  train.train_and_evaluate(c, wd)
  before = open(os.path.join(wd, "config.json")).read()
  lines = open(os.path.join(wd, "metrics.jsonl")).read()
  c.optimizer.name = "adamw"  # a different optimizer state: the checkpoint cannot load
  with pytest.raises(train.TrainingError, match="does not fit this config's model or optimizer"):
    train.train_and_evaluate(c, wd)
  assert open(os.path.join(wd, "config.json")).read() == before
  # Rerunning the finished run reports its results without logging them a second time.
  again = train.train_and_evaluate(_tiny_digits(), wd)
  assert open(os.path.join(wd, "metrics.jsonl")).read() == lines
  last = [json.loads(l) for l in lines.splitlines() if '"test"' in l][-1]
  assert again["test"]["loss"] == pytest.approx(last["loss"], rel=1e-6)


def test_a_run_with_no_steps_evaluates_and_logs_once(tmp_path):
  c = _tiny_digits(steps=0)
  c.num_epochs = 0
  wd = str(tmp_path / "wd")
  results = train.train_and_evaluate(c, wd)
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [(l["step"], l["split"]) for l in lines] == [(0, "validation"), (0, "test")]
  assert lines[1]["loss"] == pytest.approx(results["test"]["loss"])
  # Rerunning it (it has no checkpoint) evaluates again but logs once, not twice.
  train.train_and_evaluate(c, wd)
  assert [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))] == lines


def test_divergence_is_named_at_its_step_between_checks(tmp_path):
  """An infinite learning rate makes the parameters non-finite with the first update; the
  run checks every 5 steps, and the error names step 1 (it named step 5, the check)."""
  c = _tiny_digits(steps=6)
  c.learning_rate = float("inf")
  c.log_every_steps = c.checkpoint_every_steps = 5
  with pytest.raises(train.TrainingError,
                     match=r"the parameters' norm became nan at step 1; the last good "
                           r"checkpoint \(step None\)"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))


@pytest.mark.parametrize("zoneout", [0.0, 0.4])
def test_batch_norm_recalibration_runs_the_network_without_dropout(zoneout):
  """The re-estimated statistics are the exact per-batch moments of the evaluated network
  (dropout off, zoneout's expectation), computed here with the float64 reference GRU and
  NumPy batch norm."""
  from gru_jax import data as data_lib
  from tests.test_zoneout import _ref
  c = _tiny_digits()
  c.model.zoneout = zoneout
  arrays, info = data_lib.load("sequential_digits", "train")
  model = train.recalibration_model(c, info)
  assert (model.dropout, model.input_dropout, model.recurrent_dropout) == (0.0, 0.0, 0.0)
  assert model.zoneout == zoneout and model.gru_eval_mode
  x = arrays["inputs"][:32]
  batch = {"inputs": jnp.asarray(x), "mask": jnp.ones(x.shape[:2], bool)}
  state = train.init_state(model, optax.adam(1e-3), jax.random.key(0), batch)
  stats = train.batch_stats_step(state, batch, model=model)
  p = state.params
  hs = _ref(GRUParams(**p["gru_0"]), x, zoneout)[1]                       # [B,T,H]
  m0, v0 = hs.reshape(-1, 8).mean(0), hs.reshape(-1, 8).var(0)
  y = (hs - m0) / np.sqrt(v0 + 1e-3) * np.asarray(p["bn_0"]["scale"]) + np.asarray(p["bn_0"]["bias"])
  h_last = _ref(GRUParams(**p["gru_1"]), y, zoneout)[0]                    # [B,H]
  np.testing.assert_allclose(stats["bn_0"]["mean"], m0, atol=1e-5)
  np.testing.assert_allclose(stats["bn_0"]["var"], v0, atol=1e-5)
  np.testing.assert_allclose(stats["bn_1"]["mean"], h_last.mean(0), atol=1e-5)
  np.testing.assert_allclose(stats["bn_1"]["var"], h_last.var(0), atol=1e-5)


def test_metrics_writer_resumes_past_a_torn_last_line(tmp_path, monkeypatch):
  """A run killed mid-write leaves a torn last line: resuming drops it (and the lines past
  the checkpoint) instead of failing on every resume; a bad line elsewhere is refused."""
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # no TensorBoard: fast
  path = tmp_path / "metrics.jsonl"
  good = [{"step": 10, "split": "train", "loss": 0.5}, {"step": 20, "split": "train", "loss": 0.4}]
  path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 30, "split": "valid')
  writer = train.MetricsWriter(str(tmp_path), resume_step=20)
  writer.write(30, "train", {"loss": 0.3})
  assert [json.loads(l) for l in path.read_text().splitlines()] == \
      good + [{"step": 30, "split": "train", "loss": 0.3}]
  path.write_text(json.dumps(good[0]) + "\n{torn\n" + json.dumps(good[1]) + "\n")
  with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
    train.MetricsWriter(str(tmp_path), resume_step=20)
  # Killed just before the newline: the whole record is kept and the next one starts a line.
  path.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]))
  train.MetricsWriter(str(tmp_path), resume_step=20).write(30, "train", {"loss": 0.3})
  assert [json.loads(l) for l in path.read_text().splitlines()] == \
      good + [{"step": 30, "split": "train", "loss": 0.3}]


def test_class_counts_skip_padded_steps():
  """Balanced class weights for per-step labels count only the steps the loss scores."""
  labels = np.array([[1, 2, 0, 0], [2, 2, 2, 0]])
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)  # the zeros are padding
  np.testing.assert_array_equal(
      np.bincount(train.scored_labels({"labels": labels, "mask": mask}), minlength=3), [0, 1, 4])
  # seq2seq scores the decoder steps (label_mask), not the source mask
  s2s = {"labels": labels, "mask": np.ones((2, 6), bool), "label_mask": ~mask}
  np.testing.assert_array_equal(np.bincount(train.scored_labels(s2s), minlength=3), [3, 0, 0])
  np.testing.assert_array_equal(train.scored_labels({"labels": np.array([3, 1])}), [3, 1])
