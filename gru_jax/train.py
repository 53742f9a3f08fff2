"""Training and evaluation: models + data + Optax, with checkpoints that survive a kill.

`train_and_evaluate(config, workdir)` is the whole job.  Its pieces are
small typed functions research code can import: `create_model`,
`create_optimizer`, `init_state`, `train_step`, `eval_step`,
`evaluate`, `recalibrate_batch_stats`.

Reproducibility: batch order depends only on (seed, epoch), dropout masks on
(seed, step, global example index), so a run resumed from a checkpoint, or
spread over a different number of devices, follows the same trajectory.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from gru_jax import data as data_lib
from gru_jax import models

Array = jax.Array
PARALLEL_MODES = ("jit", "pmap")
AXIS = "batch"


class TrainingError(RuntimeError):
  """A run cannot go on (non-finite loss, incompatible workdir, ...)."""


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  batch_stats: Any


# ----------------------------------------------------------------------------- construction

def create_model(config: ml_collections.ConfigDict, info: data_lib.DatasetInfo, *,
                 axis_name: str | None = None, **overrides) -> nn.Module:
  """The model ``config.model`` describes, sized for the dataset ``info``.

  A `SequenceModel`, or a `Seq2Seq` for a "seq2seq" dataset (its GRU fields
  come from the same config keys; it has no batch norm).
  """
  m = config.model
  common = dict(
      hidden_sizes=tuple(m.hidden_sizes), embed_dim=m.embed_dim, dropout=m.dropout,
      recurrent_dropout=m.recurrent_dropout, variant=m.variant, bidirectional=m.bidirectional,
      unroll=m.unroll, remat_chunk=config.remat or None, backend=m.backend,
      compute_dtype=None if config.compute_dtype == "float32" else jnp.dtype(config.compute_dtype))
  if info.task == "seq2seq":
    if m.batch_norm or m.input_dropout:
      raise ValueError(f"dataset {info.name!r} is sequence to sequence (models.Seq2Seq): set "
                       "config.model.batch_norm=False and config.model.input_dropout=0.0 "
                       f"(got {m.batch_norm}, {m.input_dropout})")
    # Batch-norm and input-dropout overrides (e.g. from recalibration_model) have nothing to
    # act on in a Seq2Seq; every other override applies.
    kw = dict(common, vocab_size=info.input_dim, num_outputs=info.num_classes,
              attention=m.get("attention", "none"),
              attention_size=m.get("attention_size", 0) or None, zoneout=m.get("zoneout", 0.0))
    kw.update({k: v for k, v in overrides.items()
               if k not in ("bn_momentum", "bn_epsilon", "input_dropout", "gru_eval_mode")})
    return models.Seq2Seq(**kw)
  if m.get("attention", "none") != "none":
    raise ValueError(f"config.model.attention={m.attention!r} is for sequence-to-sequence "
                     f"data (models.Seq2Seq); dataset {info.name!r} is {info.task!r}: set "
                     "config.model.attention='none'")
  kw = dict(
      common, task=info.task, num_outputs=info.num_classes, batch_norm=m.batch_norm,
      input_dropout=m.input_dropout, zoneout=m.get("zoneout", 0.0),
      vocab_size=info.input_dim if info.input_kind == "tokens" else None,
      bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon, axis_name=axis_name)
  kw.update(overrides)
  return models.SequenceModel(**kw)


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int
                     ) -> optax.GradientTransformation:
  """Adam (default) or AdamW with optional global-norm clipping and warmup/cosine schedule."""
  o = config.optimizer
  # optax.clip_by_global_norm(c < 0) scales every gradient by c / norm: gradient ascent.
  if isinstance(o.clip_norm, bool) or not isinstance(o.clip_norm, (int, float)) or o.clip_norm < 0:
    raise ValueError(f"config.optimizer.clip_norm must be a number >= 0 (0: no clipping), "
                     f"got {o.clip_norm!r}")
  if o.schedule == "constant":
    lr = config.learning_rate
  elif o.schedule == "warmup_cosine":
    data_lib.base.check_int("config.optimizer.warmup_steps", o.warmup_steps, 0)
    lr = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, o.warmup_steps,
                                            max(total_steps, o.warmup_steps + 1))
  else:
    raise ValueError(f"config.optimizer.schedule must be 'constant' or 'warmup_cosine', "
                     f"got {o.schedule!r}")
  if o.name == "adam":
    opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  elif o.name == "adamw":
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  else:
    raise ValueError(f"config.optimizer.name must be 'adam' or 'adamw', got {o.name!r}")
  if o.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)
  return opt


def model_inputs(batch: dict) -> dict:
  """Keyword inputs a model takes besides (inputs, mask): a seq2seq batch's decoder_inputs."""
  return {"decoder_inputs": batch["decoder_inputs"]} if "decoder_inputs" in batch else {}


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: Array,
               batch: dict) -> TrainState:
  """A fresh state; ``batch`` ("inputs", "mask"[, "decoder_inputs"]) only gives the shapes."""
  first = {k: v[:1] for k, v in batch.items()}
  variables = model.init(rng, first["inputs"], first["mask"], train=False,
                         **model_inputs(first))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    batch_stats=variables.get("batch_stats", {}))


def class_weights(labels: np.ndarray, num_classes: int, counts: np.ndarray | None = None
                  ) -> np.ndarray:
  """sklearn's "balanced" weights n / (C · count_c) from training labels; unseen classes get 0.

  ``counts`` [C], if given, replaces the labels' own class counts (the sum
  over all processes when each holds only its shard of the split).
  """
  if counts is None:
    counts = np.bincount(labels.reshape(-1), minlength=num_classes)
  counts = np.asarray(counts, np.float64)
  w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
  return w.astype(np.float32)


def _across_processes(x: np.ndarray, reduce: Callable) -> np.ndarray:
  """``reduce`` over processes of each process's ``x`` (a no-op with one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return reduce(np.asarray(multihost_utils.process_allgather(np.asarray(x))), axis=0)


# ----------------------------------------------------------------------------- losses and steps

def _per_example_terms(task: str, outputs: Array, batch: dict, cw: Array | None):
  """Loss terms, their weights and (for classification-like tasks) predictions.

  Returns (loss [N], weight [N], pred, label) flattened over examples or
  (example, step) pairs; weight folds in padding, masks and class weights.
  """
  w = batch["weight"]
  if task == "regression":
    err = outputs - batch["labels"].reshape(outputs.shape)
    return jnp.mean(err ** 2, -1), w, None, None
  labels = batch["labels"]
  if task in ("tagging", "lm", "seq2seq"):
    step_mask = batch["label_mask"] if task == "seq2seq" else batch["mask"]
    w = (step_mask * w[:, None]).reshape(-1)
    outputs = outputs.reshape(-1, outputs.shape[-1])
    labels = labels.reshape(-1)
  loss = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), labels)
  lw = w if cw is None else w * cw[labels]
  return loss, lw, jnp.argmax(outputs, -1), (labels, w)


def _sum(x, axis_name):
  s = jnp.sum(x)
  return s if axis_name is None else jax.lax.psum(s, axis_name)


def train_step(state: TrainState, batch: dict, rng: Array, *, model: nn.Module,
               tx: optax.GradientTransformation, cw: Array | None = None,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
  """One optimisation step on a batch (a device's shard under pmap).

  The loss is the weighted sum over the GLOBAL batch divided by its total
  weight, so it does not depend on how the batch is split over devices.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    out, upd = model.apply({"params": params, "batch_stats": state.batch_stats},
                           batch["inputs"], batch["mask"], train=True,
                           example_ids=batch["example_id"], rngs={"dropout": step_rng},
                           mutable=["batch_stats"], **model_inputs(batch))
    loss, lw, _, _ = _per_example_terms(model.task, out, batch, cw)
    total = jnp.maximum(_sum(lw, axis_name), 1e-9)
    return jnp.sum(loss * lw) / total, upd

  (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.psum(grads, axis_name)
    loss = jax.lax.psum(loss, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                      batch_stats=upd.get("batch_stats", state.batch_stats))
  return new, {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params)}


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, num_classes: int,
              axis_name: str | None = None) -> dict:
  """Sums over a batch (padding has weight 0): loss, count and a confusion matrix or squared error."""
  out = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                    batch["inputs"], batch["mask"], train=False, **model_inputs(batch))
  loss, lw, pred, lab = _per_example_terms(model.task, out, batch, None)
  sums = {"loss": jnp.sum(loss * lw), "count": jnp.sum(lw)}
  if model.task == "seq2seq":
    # All of a target's teacher-forced argmaxes right <=> greedy decoding reproduces it exactly.
    wrong = (pred != lab[0]).reshape(batch["labels"].shape) & batch["label_mask"]
    sums["sequences"] = jnp.sum(batch["weight"])
    sums["sequences_right"] = jnp.sum(batch["weight"] * ~jnp.any(wrong, -1))
  if model.task == "regression":
    sums["sq_err"] = jnp.sum(loss * lw)
  else:
    labels, w = lab
    idx = labels * num_classes + pred
    sums["confusion"] = jnp.zeros(num_classes * num_classes).at[idx].add(w).reshape(
        num_classes, num_classes)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def summarize(sums: dict, task: str, extras: dict | None = None) -> dict:
  """Host-side metrics from summed eval terms: loss, accuracy, per-class recall, macro-F1, RMSE."""
  sums = jax.tree.map(np.asarray, sums)
  count = max(float(sums["count"]), 1e-12)
  out = {"loss": float(sums["loss"]) / count, "count": float(sums["count"])}
  if task == "regression":
    out["mse"] = float(sums["sq_err"]) / count
    out["rmse"] = math.sqrt(out["mse"])
    std = (extras or {}).get("std")
    if std is not None:  # in the data's original units
      out["rmse_original_units"] = out["rmse"] * float(std)
    return out
  cm = sums["confusion"].astype(np.float64)
  out["accuracy"] = float(np.trace(cm) / max(cm.sum(), 1e-12))
  if task == "seq2seq":
    out["sequence_accuracy"] = float(sums["sequences_right"]) / max(float(sums["sequences"]),
                                                                    1e-12)
  if task in ("lm", "seq2seq"):
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
    if task == "lm":
      out["bits_per_char"] = out["loss"] / math.log(2)
    return out
  support = cm.sum(1)
  predicted = cm.sum(0)
  tp = np.diag(cm)
  recall = np.where(support > 0, tp / np.maximum(support, 1e-12), np.nan)
  precision = np.where(predicted > 0, tp / np.maximum(predicted, 1e-12), 0.0)
  rec0 = np.nan_to_num(recall)
  f1 = np.where(precision + rec0 > 0, 2 * precision * rec0 / np.maximum(precision + rec0, 1e-12),
                0.0)
  present = support > 0
  # scikit-learn's macro average: every class in the labels or the predictions, so a class
  # predicted but absent from the split counts with F1 = 0; classes in neither are left out.
  seen = present | (predicted > 0)
  out["macro_f1"] = float(f1[seen].mean()) if seen.any() else 0.0
  out["balanced_accuracy"] = float(np.nanmean(recall)) if present.any() else 0.0
  out["per_class_recall"] = [None if np.isnan(r) else float(r) for r in recall]
  out["confusion_matrix"] = cm.astype(np.int64).tolist()
  return out


# ----------------------------------------------------------------------------- parallel runtime

@dataclasses.dataclass
class Runtime:
  """How arrays reach devices and which compiled steps run: "jit" (sharded) or "pmap"."""
  mode: str
  mesh: jax.sharding.Mesh  # 1-D over all devices of all processes

  @property
  def axis_name(self):
    return AXIS if self.mode == "pmap" else None

  def check_batch(self, global_batch: int, what: str):
    n = jax.device_count()
    if global_batch % n:
      raise ValueError(f"{what}={global_batch} must be divisible by the number of devices ({n}) "
                       f"across {jax.process_count()} process(es)")

  def put_batch(self, local: dict) -> dict:
    if self.mode == "pmap":
      nd = jax.local_device_count()
      return jax.tree.map(lambda a: a.reshape((nd, a.shape[0] // nd) + a.shape[1:]), local)
    sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(AXIS))
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)

  def put_state(self, state: TrainState) -> TrainState:
    if self.mode == "pmap":
      return flax.jax_utils.replicate(jax.tree.map(_host, state))
    # From host values, so no device-to-device copy ever crosses hosts.
    return jax.tree.map(lambda a: jax.make_array_from_callback(
        a.shape, self.replicated, lambda idx, h=_host(a): h[idx]), state)

  @property
  def replicated(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def host_state(self, state: TrainState) -> TrainState:
    """The state as checkpoints take it: one copy for pmap, the global arrays for jit."""
    if self.mode == "pmap":
      return flax.jax_utils.unreplicate(state)
    return state

  def compile(self, fn: Callable, static_kw: dict, n_args: int) -> Callable:
    f = functools.partial(fn, **static_kw)
    if self.mode == "pmap":
      # Arguments after the first two (state, batch) are replicated host values (rng).
      in_axes = (0, 0) + (None,) * (n_args - 2)
      return jax.pmap(f, axis_name=AXIS, in_axes=in_axes)
    return jax.jit(f)

  def scalar(self, x) -> np.ndarray:
    """A replicated device value on the host (also when other processes hold shards)."""
    return np.asarray(x[0]) if self.mode == "pmap" else _host(x)


def make_runtime(mode: str) -> Runtime:
  if mode not in PARALLEL_MODES:
    raise ValueError(f"config.parallel must be one of {PARALLEL_MODES}, got {mode!r}")
  return Runtime(mode, jax.sharding.Mesh(np.array(jax.devices()), (AXIS,)))


def _host(a) -> np.ndarray:
  """A replicated array's value on this host, also when other processes hold copies."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    a = a.addressable_data(0)
  return np.asarray(a)


# ----------------------------------------------------------------------------- evaluation

def evaluate(runtime: Runtime, eval_fn: Callable, state, arrays: dict, batch_size: int,
             seed: int) -> dict:
  """Sums `eval_step` over a whole split; the last partial batch is padded with weight 0."""
  total = None
  for batch in data_lib.batches(arrays, batch_size, seed=seed, epoch=0, shuffle=False,
                                drop_remainder=False, process_index=jax.process_index(),
                                process_count=jax.process_count()):
    sums = jax.tree.map(runtime.scalar, eval_fn(state, runtime.put_batch(batch)))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  return total


def recalibration_model(config: ml_collections.ConfigDict, info: data_lib.DatasetInfo, *,
                        axis_name: str | None = None) -> nn.Module:
  """The model for `batch_stats_step`: the evaluated network (every dropout off), with batch
  norm momentum 0 so that one step returns the batch's exact statistics."""
  return create_model(config, info, axis_name=axis_name, bn_momentum=0.0, dropout=0.0,
                      input_dropout=0.0, recurrent_dropout=0.0, gru_eval_mode=True)


def batch_stats_step(state: TrainState, batch: dict, *, model: nn.Module):
  """This batch's exact batch-norm statistics (``model`` built with bn_momentum=0, dropout off)."""
  _, upd = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       batch["inputs"], batch["mask"], train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(0)}, example_ids=None,
                       **model_inputs(batch))
  return upd["batch_stats"]


def recalibrate_batch_stats(runtime: Runtime, stats_fn: Callable, state, batches,
                            num_batches: int):
  """Re-estimates batch-norm running statistics on training data (dropout off).

  Keras-style running averages (momentum 0.99) lag far behind the weights in
  a short run; averaging exact per-batch statistics (`batch_stats_step`) over
  ``num_batches`` training batches (from the iterable ``batches``, this
  process's part of each) gives the statistics the evaluated network really sees.
  """
  acc, n = None, 0
  for batch in batches:
    if n >= num_batches:
      break
    s = stats_fn(state, runtime.put_batch(batch))
    acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    n += 1
  if n == 0:
    return state
  return state.replace(batch_stats=jax.tree.map(lambda a: a / n, acc))


# ----------------------------------------------------------------------------- checkpoints and logs

class MetricsWriter:
  """Appends JSON lines to <workdir>/metrics.jsonl and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    # A killed run may have logged past its last checkpoint; drop those lines so
    # the resumed run's log is exactly an uninterrupted run's.
    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = f.readlines()
      keep = []
      for i, line in enumerate(lines):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          # A run killed mid-write leaves its last line torn (no newline): drop it. Anything
          # else is damage that nobody should lose silently.
          if i == len(lines) - 1 and not line.endswith("\n"):
            continue
          raise ValueError(f"{self.path} line {i + 1} is not JSON: {line.strip()[:80]!r}; "
                           "fix or delete that line to resume") from None
        if rec["step"] <= resume_step:
          keep.append(line if line.endswith("\n") else line + "\n")  # the next record starts a line
      with open(self.path, "w") as f:
        f.writelines(keep)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      self._tf = tf
    except ImportError:
      logging.warning("tensorflow not importable: no TensorBoard events are written")

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split, **metrics}
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      with self._tb.as_default():
        for k, v in metrics.items():
          if isinstance(v, (int, float)) and not isinstance(v, bool):
            self._tf.summary.scalar(f"{split}/{k}", v, step=int(step))
      self._tb.flush()


def _checkpoint_manager(workdir: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      # Synchronous saves: once a step's checkpoint is logged it is on disk, so a
      # SIGKILL right after loses nothing that was reported as checkpointed.
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False))


def _save(mngr, step: int, state: TrainState):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def _restore(mngr, template: TrainState, sharding) -> TrainState:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = mngr.latest_step()
  # Restored replicated over all devices of all processes: the topology it was
  # saved with, or a new one (orbax reshards).
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          template)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax raises several types for a tree/shape mismatch
    raise TrainingError(
        f"the checkpoint at step {step} in {mngr.directory} does not fit this config's model "
        f"or optimizer ({type(e).__name__}: {str(e)[:300]}); use a fresh --workdir or the "
        "command that wrote it") from e


def dataset_options(config) -> dict:
  """``config.dataset`` as `data.load` keyword arguments (all but its name)."""
  return {k: v for k, v in config.dataset.to_dict().items() if k != "name"}


def restore_for_inference(workdir: str):
  """(config, model, variables, info) of the latest checkpoint in a training workdir.

  The config is the one the run last ran with (`stored_config`: the last line of
  ``<workdir>/config_history.jsonl``, else ``<workdir>/config.json``).
  """
  if not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} does not exist" if not os.path.exists(workdir) else
                     f"workdir {workdir} is not a directory")
  stored = stored_config(workdir)
  if stored is None:
    raise ValueError(f"{workdir} holds no config.json: is it a gru_jax training workdir?")
  config = ml_collections.ConfigDict(stored)
  arrays, info = data_lib.load(config.dataset.name, "train", **dataset_options(config))
  model = create_model(config, info)
  batch = {k: arrays[k][:1] for k in ("inputs", "mask", "decoder_inputs") if k in arrays}
  state = init_state(model, create_optimizer(config, 1), jax.random.key(0), batch)
  mngr = _checkpoint_manager(workdir)
  if mngr.latest_step() is None:
    raise ValueError(f"{workdir} holds no checkpoint yet")
  state = _restore(mngr, state, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return config, model, {"params": state.params, "batch_stats": state.batch_stats}, info


def decode_accuracy(workdir: str, beam_sizes=(1,), split: str = "test",
                    length_penalty: float = 0.0, batch_size: int = 500) -> dict:
  """{beam size: exact-match sequence accuracy over ``split``} of a seq2seq run's latest
  checkpoint: 1 decodes greedily (the trainer's ``sequence_accuracy``), more by
  `models.beam_search` (its best beam), ``batch_size`` sources per compiled call."""
  exact, _ = decode_exact(workdir, beam_sizes, split, length_penalty, batch_size)
  return {k: float(np.mean(v)) for k, v in exact.items()}


def accuracy_by_length(exact: np.ndarray, lengths: np.ndarray, edges) -> dict:
  """{(lo, hi): mean of exact [N] over the examples with lo <= length < hi}, for consecutive
  ``edges``; bins with no example are left out."""
  edges = check_length_bins(edges)
  out = {}
  for lo, hi in zip(edges, edges[1:]):
    sel = (lengths >= lo) & (lengths < hi)
    if sel.any():
      out[(lo, hi)] = float(np.mean(exact[sel]))
  return out


def check_length_bins(edges) -> list[int]:
  """Bin edges as ints: at least two, increasing."""
  try:
    ints = [int(e) for e in edges]
  except (TypeError, ValueError):
    ints = None
  if not ints or len(ints) < 2 or any(b <= a for a, b in zip(ints, ints[1:])):
    raise ValueError(f"length bin edges must be at least two increasing ints, got {list(edges)}")
  return ints


def decode_exact(workdir: str, beam_sizes=(1,), split: str = "test",
                 length_penalty: float = 0.0, batch_size: int = 500
                 ) -> tuple[dict, np.ndarray]:
  """({beam size: whether each example of ``split`` decodes exactly, bool [N]}, source
  lengths [N]) of a seq2seq run's latest checkpoint (see `decode_accuracy`)."""
  sizes = [int(k) for k in beam_sizes]
  if not sizes or min(sizes) < 1:
    raise ValueError(f"beam sizes must be ints >= 1, got {list(beam_sizes)}")
  config, model, variables, info = restore_for_inference(workdir)
  if model.task != "seq2seq":
    raise ValueError(f"{workdir} holds a {model.task!r} model, not a seq2seq one")
  a, _ = data_lib.load(config.dataset.name, split, **dataset_options(config))
  ex = info.extras
  kw = dict(max_len=a["labels"].shape[1], bos_id=ex["bos_id"], eos_id=ex["eos_id"],
            pad_id=ex["pad_id"], length_penalty=length_penalty)
  results = {}
  for k in sizes:
    decode = jax.jit(lambda s, m, k=k: models.decode(model, variables, s, m, beam_size=k, **kw))
    out = np.concatenate([np.asarray(decode(a["inputs"][i:i + batch_size],
                                            a["mask"][i:i + batch_size]))
                          for i in range(0, len(a["inputs"]), batch_size)])
    want = np.where(a["label_mask"], a["labels"], ex["pad_id"])
    results[k] = (out == want).all(-1)
  return results, a["mask"].sum(-1)


def _dataset_identity(options: dict | None) -> dict | None:
  """The dataset options that decide its contents: defaults filled in (a config may list them
  or not), data_dir left out (the same data may move)."""
  if not options or options.get("name") not in data_lib.NAMES:
    return options
  full = {**data_lib.options(options["name"]), **options}
  return {k: v for k, v in full.items() if k != "data_dir"}


# Model keys that choose how the network is computed, not what it computes (its weights and
# outputs are the same): a resumed run may change them like any training setting.
IMPLEMENTATION_KEYS = ("backend", "unroll")


def _flat(d: dict | None, prefix: str = "config.") -> dict:
  """{"config.model.dropout": 0.5, ...}: nested dicts flattened to dotted keys, JSON values."""
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.loads(json.dumps(v))
  return out


_ABSENT = "<absent>"


def _differences(old: dict, new: dict) -> dict:
  """{key: (old value, new value)} over the flattened keys of two configs."""
  return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
          if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def _describe(diff: dict) -> str:
  return ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items())


def stored_config(workdir: str) -> dict | None:
  """The config a workdir's run last ran with (the last line of config_history.jsonl, else
  config.json), as a dict; None if it holds neither."""
  history = os.path.join(workdir, "config_history.jsonl")
  if os.path.exists(history):
    with open(history) as f:
      lines = [l for l in f if l.strip()]
    for line in reversed(lines):
      try:
        return json.loads(line)["config"]
      except (json.JSONDecodeError, KeyError):  # a torn last line: the one before it
        continue
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


# config.model keys added after runs were written, with the value an older config.json
# that lacks them means.
ADDED_MODEL_KEYS = {"zoneout": 0.0, "attention": "none", "attention_size": 0}


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Refuses to resume a workdir written by a different model or dataset, naming each key
  that differs; returns the other keys that differ ({key: (stored, now)}), for a warning."""
  old = stored_config(workdir)
  if old is None:
    return {}
  new = config.to_dict()
  def identity(c):
    model = {**ADDED_MODEL_KEYS, **(c.get("model") or {})}
    model = {k: v for k, v in model.items() if k not in IMPLEMENTATION_KEYS}
    return {**_flat(model, "config.model."),
            **_flat(_dataset_identity(c.get("dataset")), "config.dataset.")}
  refused = _differences(identity(old), identity(new))
  if refused:
    what = " and ".join(w for w in ("model", "dataset")
                        if any(k.startswith(f"config.{w}.") for k in refused))
    raise TrainingError(f"workdir {workdir} holds a run with a different {what} config: "
                        f"{_describe(refused)}; use a fresh --workdir or the same config")
  return _differences(_flat(old), _flat(new))


def _record_config(workdir: str, config: ml_collections.ConfigDict, start: int,
                   changed: dict):
  """config.json is the config the run started with: written when no checkpoint exists,
  kept as it is on resume.  config_history.jsonl gets a line per start,
  {"start_step", "changed", "config"}, so every step's settings stay on record."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  history = os.path.join(workdir, "config_history.jsonl")
  if start == 0 or not os.path.exists(path):
    with open(path + ".tmp", "w") as f:  # atomic: other processes may be reading it
      f.write(config.to_json(indent=2))
    os.replace(path + ".tmp", path)
  rec = {"start_step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "changed": {k: {"was": a, "now": b} for k, (a, b) in changed.items()},
         "config": json.loads(config.to_json())}
  mode = "w" if start == 0 else "a"  # a fresh start: the history of an unfinished attempt goes
  with open(history, mode) as f:
    f.write(json.dumps(rec) + "\n")


class _Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag checked between steps, so a checkpoint is
  written first; the run then exits with 128 + the signal's number (143, 130).  A second
  Ctrl-C interrupts at once (KeyboardInterrupt), without the checkpoint."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signum = None
    self._old = {}

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_code(self) -> int:
    return 128 + int(self.signum)

  def agreed(self, step: int, every: int) -> bool:
    """Whether to checkpoint and stop after ``step``: at once with one process.  With several,
    every process must enter the collective save at the same step, so the flag is all-gathered
    at steps that are multiples of ``every`` (a signal may reach one host only, or the hosts
    between different steps); the exit code becomes the signal another process received."""
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    signum = int(_across_processes(np.int32(self.signum or 0), np.max))
    if signum:
      self.requested, self.signum = True, self.signum or signum
    return bool(signum)

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signum = self.signum or signum
    if signum == signal.SIGINT:
      logging.warning("SIGINT: checkpointing after this step (Ctrl-C again to stop at once)")

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class _Progress:
  """Steps per second of training alone, for the progress line's rate and ETA: the first
  step (it compiles) and the time spent evaluating and checkpointing are left out."""

  def __init__(self, clock: Callable[[], float] = time.monotonic):
    self.clock = clock
    self.steps, self.seconds = 0, 0.0
    self._since = None  # (clock, step) while timing
    self._stopped = None  # clock when timing paused
    self.pauses = []  # seconds of each evaluation/checkpoint pause

  def restart(self, step: int):
    """Timing (re)starts at ``step``, with its work done (e.g. after an evaluation)."""
    now = self.clock()
    if self._stopped is not None:
      self.pauses.append(now - self._stopped)
      self._stopped = None
    self._since = (now, step)

  def stop(self, step: int):
    """Timing pauses at ``step``, with its work done (e.g. before an evaluation)."""
    if self._since is not None:
      t, s = self._since
      self.seconds += self.clock() - t
      self.steps += step - s
      self._since = None
      self._stopped = self.clock()

  def rate(self, step: int) -> float | None:
    """Steps per second timed so far (to ``step``, done), or None before any was timed."""
    steps, seconds = self.steps, self.seconds
    if self._since is not None:
      t, s = self._since
      steps, seconds = steps + step - s, seconds + self.clock() - t
    return steps / seconds if steps > 0 and seconds > 0 else None

  def eta(self, step: int, total: int, pauses_left: int) -> float | None:
    """Seconds to ``total``: the steps left at `rate`, plus ``pauses_left`` evaluations or
    checkpoints at the mean of those timed after the first (which compiles)."""
    rate = self.rate(step)
    if rate is None:
      return None
    later = self.pauses[1:]
    return (total - step) / rate + (pauses_left * sum(later) / len(later) if later else 0.0)


def _pauses_between(step: int, total: int, eval_every: int, ckpt_every: int) -> int:
  """Steps in (step, total] that evaluate or checkpoint (multiples of either, and the last)."""
  def count(n):  # multiples of eval_every or ckpt_every in [1, n]
    return n // eval_every + n // ckpt_every - n // math.lcm(eval_every, ckpt_every)
  n = count(total) - count(step)
  last = total > step and (total % eval_every == 0 or total % ckpt_every == 0)
  return n + (0 if last or total <= step else 1)


def _fmt_time(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- the job

def scored_labels(arrays: dict) -> np.ndarray:
  """The labels the loss scores, flat: per-step labels ([N,T]) only at steps their mask keeps
  (``label_mask`` for seq2seq, else ``mask``), so padding does not weigh in class counts."""
  labels = arrays["labels"]
  if labels.ndim > 1:
    keep = arrays.get("label_mask", arrays.get("mask"))
    if keep is not None and keep.shape == labels.shape:
      return labels[np.asarray(keep, bool)]
  return labels.reshape(-1)


class _TrainData:
  """The training split as this process reads it: whole (``config.data_shards=0``:
  every process loads it and keeps its slice of each global batch) or in S
  shards, of which process p of P reads only shards [p·S/P, (p+1)·S/P).
  Either way the global batches depend on the seed and S alone, not on P."""

  def __init__(self, config, ds_opts: dict):
    self.config, b = config, config.batch_size
    name, pi, pc = config.dataset.name, jax.process_index(), jax.process_count()
    self.num_shards = s = config.data_shards or 0
    if s:
      if s < 0 or s % pc:
        raise ValueError(f"config.data_shards={s} must be a positive multiple of the number "
                         f"of processes ({pc}), or 0 to read the whole split in every process")
      if b % s:
        raise ValueError(f"config.batch_size={b} must be divisible by config.data_shards={s}")
      if config.bucket_by_length or config.trim_to_multiple:
        raise ValueError("config.bucket_by_length and config.trim_to_multiple need "
                         "config.data_shards=0 (they order the whole split)")
      mine = range(pi * s // pc, (pi + 1) * s // pc)
      self.shards = {}
      for i in mine:
        self.shards[i], self.info = data_lib.load(name, "train", shard=(i, s), **ds_opts)
      local = min(len(a["inputs"]) // (b // s) for a in self.shards.values())
      self.steps_per_epoch = int(_across_processes(np.int64(local), np.min))
      held = sum(len(a["inputs"]) for a in self.shards.values())
      logging.info("process %d of %d reads training shards %d-%d of %d (%d examples%s)", pi, pc,
                   mine[0], mine[-1], s, held,
                   "" if data_lib.reads_shards(name) else "; this loader builds the whole split")
    else:
      self.arrays, self.info = data_lib.load(name, "train", **ds_opts)
      self.steps_per_epoch = data_lib.num_batches(len(self.arrays["inputs"]), b, True)
    if self.steps_per_epoch == 0:
      raise ValueError(f"config.batch_size={b} exceeds the training examples "
                       f"({self.info.num_examples.get('train')}"
                       f"{f', in shards of {b // s} rows per batch' if s else ''})")

  def class_counts(self, num_classes: int) -> np.ndarray:
    """Training labels per class, over the whole split (per-step labels: the scored steps)."""
    parts = self.shards.values() if self.num_shards else [self.arrays]
    counts = sum(np.bincount(scored_labels(a), minlength=num_classes) for a in parts)
    return _across_processes(counts, np.sum) if self.num_shards else counts

  def first_batch(self) -> dict:
    """Some training rows, for shapes at init (the same rows in every process)."""
    arrays = self.shards[min(self.shards)] if self.num_shards else self.arrays
    per = self.config.batch_size // max(self.num_shards, 1)
    return next(data_lib.batches(arrays, per, seed=0, epoch=0, shuffle=False,
                                 drop_remainder=True))

  def batches(self, epoch: int, start: int, seed: int, plain: bool = False):
    """This process's part of global batches start.. of ``epoch``; ``plain``: no bucketing."""
    c = self.config
    if self.num_shards:
      return data_lib.sharded_batches(self.shards, c.batch_size, num_shards=self.num_shards,
                                      seed=seed, epoch=epoch, shuffle=True,
                                      num_batches=self.steps_per_epoch, start_batch=start)
    return data_lib.batches(self.arrays, c.batch_size, seed=seed, epoch=epoch, shuffle=True,
                            drop_remainder=True, process_index=jax.process_index(),
                            process_count=jax.process_count(), start_batch=start,
                            bucket_by_length=c.bucket_by_length and not plain,
                            trim_to_multiple=(c.trim_to_multiple or None) if not plain else None)


_COUNTS = {"batch_size": 1, "log_every_steps": 1, "num_epochs": 0, "num_train_steps": 0,
           "eval_every_steps": 0, "checkpoint_every_steps": 0, "eval_batch_size": 0,
           "bn_recalibrate_batches": 0, "remat": 0, "trim_to_multiple": 0, "data_shards": 0,
           "seed": 0, "preemption_check_every_steps": 1}
_RATES = ("dropout", "recurrent_dropout", "input_dropout", "zoneout")  # config.model, [0, 1)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _one_of(key: str, value, choices):
  if value not in choices:
    raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for counts and sizes out of range, before anything is loaded."""
  for key, minimum in _COUNTS.items():
    if key in config:
      data_lib.base.check_int(f"config.{key}", config[key], minimum)
  if "compute_dtype" in config:
    try:  # a typo such as "bf16" made jnp.dtype raise a TypeError with a traceback
      floating = jnp.issubdtype(jnp.dtype(config.compute_dtype), jnp.floating)
    except TypeError:
      floating = False
    if not floating:
      raise ValueError(f"config.compute_dtype must be a floating-point dtype name such as "
                       f"'float32' or 'bfloat16', got {config.compute_dtype!r}")
  sizes = config.model.hidden_sizes
  if (not isinstance(sizes, (tuple, list)) or not sizes
      or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in sizes)):
    raise ValueError(f"config.model.hidden_sizes must be a non-empty tuple of ints >= 1, "
                     f"e.g. '(128,)', got {sizes!r}")
  lr = config.get("learning_rate")
  # lr <= 0 trains by gradient ascent (or not at all); NaN fails the comparison too.
  if not _is_number(lr) or not lr > 0:
    raise ValueError(f"config.learning_rate must be > 0, got {lr!r}")
  m = config.model
  for key in _RATES:
    if key in m and (not _is_number(m[key]) or not 0 <= m[key] < 1):
      # A negative rate silently meant no dropout; 1 or more drops everything.
      raise ValueError(f"config.model.{key} must be in [0, 1), got {m[key]!r}")
  from gru_jax import cell, scan  # pylint: disable=import-outside-toplevel
  _one_of("config.model.variant", m.variant, cell.VARIANTS)
  _one_of("config.model.backend", m.backend, scan.BACKENDS)
  if "unroll" in m:
    data_lib.base.check_int("config.model.unroll", m.unroll, 1)
  if "attention" in m:
    _one_of("config.model.attention", m.attention, models.ATTENTIONS)
  if "attention_size" in m:
    data_lib.base.check_int("config.model.attention_size", m.attention_size, 0)
  _one_of("config.parallel", config.parallel, PARALLEL_MODES)
  if config.get("class_weights") not in ("", None, "balanced"):
    raise ValueError(f"config.class_weights must be '' or 'balanced', got "
                     f"{config.class_weights!r}")
  o = config.optimizer
  _one_of("config.optimizer.name", o.name, ("adam", "adamw"))
  _one_of("config.optimizer.schedule", o.schedule, ("constant", "warmup_cosine"))
  if not _is_number(o.clip_norm) or not o.clip_norm >= 0:
    raise ValueError(f"config.optimizer.clip_norm must be a number >= 0 (0: no clipping), "
                     f"got {o.clip_norm!r}")
  if o.schedule == "warmup_cosine":
    data_lib.base.check_int("config.optimizer.warmup_steps", o.warmup_steps, 0)
    if config.num_train_steps:
      _check_warmup(config, config.num_train_steps)


def _check_warmup(config: ml_collections.ConfigDict, total_steps: int):
  o = config.optimizer
  # (A run with no steps only evaluates: its schedule does not matter.)
  if o.schedule == "warmup_cosine" and o.warmup_steps > total_steps > 0:
    raise ValueError(f"config.optimizer.warmup_steps={o.warmup_steps} exceeds the run's "
                     f"{total_steps} training steps (the learning rate would never reach "
                     "config.learning_rate)")


def _check_workdir_path(workdir: str):
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a directory")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and evaluates.

  Returns the final metrics per split, e.g. ``{"validation": {...}, "test": {...}}``.
  """
  check_config(config)
  _check_workdir_path(workdir)
  changed = _check_workdir_config(workdir, config)  # refuses another model before loading
  runtime = make_runtime(config.parallel)
  runtime.check_batch(config.batch_size, "config.batch_size")
  eval_bs = config.eval_batch_size or config.batch_size
  runtime.check_batch(eval_bs, "config.eval_batch_size")
  ds_opts = dataset_options(config)
  splits = {}
  info = None
  for split in tuple(config.eval_splits):
    splits[split], info = data_lib.load(config.dataset.name, split, **ds_opts)
  train_data = _TrainData(config, ds_opts)
  info = info or train_data.info
  steps_per_epoch = train_data.steps_per_epoch
  total_steps = config.num_train_steps or steps_per_epoch * config.num_epochs
  _check_warmup(config, total_steps)
  eval_every = config.eval_every_steps or steps_per_epoch
  ckpt_every = config.checkpoint_every_steps or eval_every

  if info.task == "seq2seq" and config.trim_to_multiple:
    raise ValueError("config.trim_to_multiple cuts the source's time axis only; it is not "
                     "supported for sequence-to-sequence datasets")
  model = create_model(config, info, axis_name=runtime.axis_name)
  tx = create_optimizer(config, total_steps)
  cw = None
  if config.class_weights == "balanced":
    if info.task not in ("classification", "tagging"):
      raise ValueError("config.class_weights='balanced' needs a classification or tagging task")
    counts = train_data.class_counts(info.num_classes)
    cw = jnp.asarray(class_weights(None, info.num_classes, counts))
  elif config.class_weights:
    raise ValueError(f"config.class_weights must be None or 'balanced', got "
                     f"{config.class_weights!r}")

  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  state = init_state(model, tx, init_rng, train_data.first_batch())

  # Created only now, with the data loaded: a run that cannot start leaves no empty workdir.
  os.makedirs(workdir, exist_ok=True)
  mngr = _checkpoint_manager(workdir)
  if mngr.latest_step() is not None:
    state = _restore(mngr, state, runtime.replicated)
    logging.info("Resumed from %s at step %d", mngr.directory, int(state.step))
  start = int(state.step)
  if start and changed:
    logging.warning("resuming %s at step %d with settings that differ from its last run's: %s "
                    "(each start's config is in %s)", workdir, start, _describe(changed),
                    os.path.join(workdir, "config_history.jsonl"))
  if start > total_steps:
    asked = (f"config.num_train_steps={config.num_train_steps}" if config.num_train_steps else
             f"config.num_epochs={config.num_epochs} ({total_steps} steps)")
    logging.warning("%s is below step %d, which %s has already reached: no training, only an "
                    "evaluation of its checkpoint", asked, start, workdir)
  _record_config(workdir, config, start, changed if start else {})
  # Without a checkpoint nothing logged before belongs to this run (a rerun of a run with no
  # steps logged its evaluation a second time): start the log afresh.
  writer = MetricsWriter(workdir, start if mngr.latest_step() is not None else -1)

  p_train = runtime.compile(train_step, dict(model=model, tx=tx, cw=cw,
                                             axis_name=runtime.axis_name), 3)
  p_eval = runtime.compile(eval_step, dict(model=model, num_classes=info.num_classes,
                                           axis_name=runtime.axis_name), 2)
  uses_bn = getattr(model, "batch_norm", False)
  p_stats = uses_bn and runtime.compile(batch_stats_step, dict(model=recalibration_model(
      config, info, axis_name=runtime.axis_name)), 2)
  dstate = runtime.put_state(state)

  def run_eval(step, dstate, write=True):
    if config.bn_recalibrate_batches and uses_bn:
      dstate = recalibrate_batch_stats(runtime, p_stats, dstate,
                                       train_data.batches(0, 0, config.seed + 7919, plain=True),
                                       config.bn_recalibrate_batches)
    results = {}
    for split in config.eval_splits:
      sums = evaluate(runtime, p_eval, dstate, splits[split], eval_bs, config.seed)
      results[split] = summarize(sums, info.task, info.extras)
      if write:
        writer.write(step, split, results[split])
      brief = {k: round(v, 4) for k, v in results[split].items()
               if isinstance(v, float) and k != "count"}
      logging.info("step %d %s %s", step, split, brief)
    return dstate, results

  results = {}
  progress = _Progress()
  step = start
  # Every step's (loss, parameter norm), left on device until the next check, so that a
  # divergence is reported at the step where it happened, not at the next log or save.
  unchecked = []
  with _Preemption() as preempt:
    while step < total_steps:
      epoch, offset = divmod(step, steps_per_epoch)
      for batch in train_data.batches(epoch, offset, config.seed):
        dstate, m = p_train(dstate, runtime.put_batch(batch), train_rng)
        step += 1
        if step == start + 1:  # the first step compiles: the rate starts after it
          jax.block_until_ready(m["loss"])
          progress.restart(step)
        unchecked.append((step, m["loss"], m["param_norm"]))
        log_now = step % config.log_every_steps == 0 or step == total_steps
        # Read once per step: a signal arriving after this step's save is handled with the next
        # step's (it used to exit claiming a checkpoint at a step it had not saved).
        stopping = preempt.agreed(step, config.get("preemption_check_every_steps", 10))
        save_now = step % ckpt_every == 0 or step == total_steps or stopping
        if log_now or save_now:  # never checkpoint a diverged state
          for at, step_loss, param_norm in unchecked:
            loss = float(runtime.scalar(step_loss))
            # The loss is the pre-update one; the parameter norm vouches for the update.
            bad = loss if not math.isfinite(loss) else float(runtime.scalar(param_norm))
            if not math.isfinite(bad):
              what = "loss" if not math.isfinite(loss) else "the parameters' norm"
              raise TrainingError(
                  f"{what} became {bad} at step {at}; the last good checkpoint "
                  f"(step {mngr.latest_step()}) in {mngr.directory} is kept. Try a lower "
                  "learning_rate or optimizer.clip_norm")
          unchecked.clear()
        if log_now:
          rate = progress.rate(step)
          eta = progress.eta(step, total_steps,
                             _pauses_between(step, total_steps, eval_every, ckpt_every))
          logging.info("step %d/%d epoch %d loss %.4f%s", step, total_steps, epoch, loss,
                       "" if rate is None else f" {rate:.1f} steps/s ETA {_fmt_time(eta)}")
          writer.write(step, "train", {"loss": loss,
                                       "grad_norm": float(runtime.scalar(m["grad_norm"]))})
        eval_now = step % eval_every == 0 or step == total_steps
        if eval_now or save_now:  # not training time: out of the rate
          jax.block_until_ready(m["loss"])
          progress.stop(step)
        if eval_now:
          dstate, results = run_eval(step, dstate)
        if save_now:
          _save(mngr, step, runtime.host_state(dstate))
          logging.info("checkpoint saved at step %d", step)
        if eval_now or save_now:
          progress.restart(step)
        if step == config.get("debug_kill_at_step", 0):
          os.kill(os.getpid(), signal.SIGKILL)  # fault injection for crash-recovery tests
        if stopping:
          mngr.wait_until_finished()
          logging.warning("%s: checkpoint written at step %d; exiting", preempt.name, step)
          raise SystemExit(preempt.exit_code)
        if step >= total_steps:
          break
  mngr.wait_until_finished()
  if not results and config.eval_splits:
    # No step to run: a run resumed at its end reports the restored state (metrics.jsonl
    # already holds it); a fresh run with no steps is an evaluation and logs it.
    dstate, results = run_eval(step, dstate, write=start == 0)
  return results
