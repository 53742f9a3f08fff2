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
    kw = dict(common, vocab_size=info.input_dim, num_outputs=info.num_classes)
    kw.update({k: v for k, v in overrides.items()
               if k not in ("bn_momentum", "bn_epsilon", "input_dropout")})
    return models.Seq2Seq(**kw)
  kw = dict(
      common, task=info.task, num_outputs=info.num_classes, batch_norm=m.batch_norm,
      input_dropout=m.input_dropout,
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
                      input_dropout=0.0, recurrent_dropout=0.0)


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


def restore_for_inference(workdir: str):
  """(config, model, variables, info) of the latest checkpoint in a training workdir.

  The config is the one the run saved in ``<workdir>/config.json``.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} holds no config.json: is it a gru_jax training workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ds_opts = {k: v for k, v in config.dataset.to_dict().items() if k != "name"}
  arrays, info = data_lib.load(config.dataset.name, "train", **ds_opts)
  model = create_model(config, info)
  batch = {k: arrays[k][:1] for k in ("inputs", "mask", "decoder_inputs") if k in arrays}
  state = init_state(model, create_optimizer(config, 1), jax.random.key(0), batch)
  mngr = _checkpoint_manager(workdir)
  if mngr.latest_step() is None:
    raise ValueError(f"{workdir} holds no checkpoint yet")
  state = _restore(mngr, state, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return config, model, {"params": state.params, "batch_stats": state.batch_stats}, info


def _dataset_identity(options: dict | None) -> dict | None:
  """The dataset options that decide its contents: defaults filled in (a config may list them
  or not), data_dir left out (the same data may move)."""
  if not options or options.get("name") not in data_lib.NAMES:
    return options
  full = {**data_lib.options(options["name"]), **options}
  return {k: v for k, v in full.items() if k != "data_dir"}


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict):
  """Refuses to resume a workdir written by a different model or dataset."""
  path = os.path.join(workdir, "config.json")
  fingerprint = {"model": config.model.to_dict(),
                 "dataset": _dataset_identity(config.dataset.to_dict())}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    old_fp = {"model": old.get("model"), "dataset": _dataset_identity(old.get("dataset"))}
    if json.loads(json.dumps(old_fp)) != json.loads(json.dumps(fingerprint)):
      diff = [k for k in ("model", "dataset") if old_fp[k] != json.loads(json.dumps(fingerprint[k]))]
      raise TrainingError(f"workdir {workdir} holds a run with a different {' and '.join(diff)} "
                          f"config ({path}); use a fresh --workdir or the same config")


def _write_config(workdir: str, config: ml_collections.ConfigDict):
  """<workdir>/config.json, written once the workdir is known to accept this config."""
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:  # atomic: other processes may be reading it
      f.write(config.to_json(indent=2))
    os.replace(path + ".tmp", path)


class _Preemption:
  """Turns SIGTERM into a flag checked between steps, so a checkpoint is written first."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


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
           "bn_recalibrate_batches": 0, "remat": 0, "trim_to_multiple": 0, "data_shards": 0}


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and evaluates.

  Returns the final metrics per split, e.g. ``{"validation": {...}, "test": {...}}``.
  """
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  runtime = make_runtime(config.parallel)
  runtime.check_batch(config.batch_size, "config.batch_size")
  eval_bs = config.eval_batch_size or config.batch_size
  runtime.check_batch(eval_bs, "config.eval_batch_size")
  ds_opts = {k: v for k, v in config.dataset.to_dict().items() if k not in ("name",)}
  splits = {}
  info = None
  for split in tuple(config.eval_splits):
    splits[split], info = data_lib.load(config.dataset.name, split, **ds_opts)
  train_data = _TrainData(config, ds_opts)
  info = info or train_data.info
  steps_per_epoch = train_data.steps_per_epoch
  total_steps = config.num_train_steps or steps_per_epoch * config.num_epochs
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

  _check_workdir_config(workdir, config)
  mngr = _checkpoint_manager(workdir)
  if mngr.latest_step() is not None:
    state = _restore(mngr, state, runtime.replicated)
    logging.info("Resumed from %s at step %d", mngr.directory, int(state.step))
  _write_config(workdir, config)
  start = int(state.step)
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
  t0, last_log = time.time(), start
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
        unchecked.append((step, m["loss"], m["param_norm"]))
        log_now = step % config.log_every_steps == 0 or step == total_steps
        save_now = step % ckpt_every == 0 or step == total_steps or preempt.requested
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
          rate = (step - last_log) / max(time.time() - t0, 1e-9)
          t0, last_log = time.time(), step
          logging.info("step %d/%d epoch %d loss %.4f %.1f steps/s ETA %s", step, total_steps,
                       epoch, loss, rate, _fmt_time((total_steps - step) / max(rate, 1e-9)))
          writer.write(step, "train", {"loss": loss,
                                       "grad_norm": float(runtime.scalar(m["grad_norm"]))})
        if step % eval_every == 0 or step == total_steps:
          dstate, results = run_eval(step, dstate)
        if save_now:
          _save(mngr, step, runtime.host_state(dstate))
          logging.info("checkpoint saved at step %d", step)
        if step == config.get("debug_kill_at_step", 0):
          os.kill(os.getpid(), signal.SIGKILL)  # fault injection for crash-recovery tests
        if preempt.requested:
          mngr.wait_until_finished()
          logging.warning("SIGTERM: checkpoint written at step %d; exiting", step)
          raise SystemExit(143)
        if step >= total_steps:
          break
  mngr.wait_until_finished()
  if not results and config.eval_splits:
    # No step to run: a run resumed at its end reports the restored state (metrics.jsonl
    # already holds it); a fresh run with no steps is an evaluation and logs it.
    dstate, results = run_eval(step, dstate, write=start == 0)
  return results
