"""A deterministic NumPy batch iterator over in-memory arrays.

Every dataset here fits in host memory, so a split is a dict of NumPy arrays
with a shared leading axis [N,...] and an epoch is a permutation of range(N)
drawn from (seed, epoch) alone.  That gives:

* exact resume: `start_batch=k` yields what the k-th batch onwards would have been;
* multi-host input: every process computes the same global batch and keeps its
  contiguous slice, so the processes' slices concatenate to the global batch;
* no dropped evaluation examples: with `drop_remainder=False` the last batch is
  padded to full size with weight-0 rows, keeping shapes fixed for `jit`.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from gru_jax.data.base import check_int

RESERVED_KEYS = ("weight", "example_id")


def _check_bool(name: str, value) -> bool:
  """`value` (a Python or NumPy bool) as a bool, else a ValueError naming `name`: a
  truthy stand-in such as the string "no" would otherwise switch the option on."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
  return bool(value)


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  """Global batches per epoch: floor(N/B) when dropping the remainder, else ceil(N/B)."""
  n = check_int("num_examples", num_examples, 0)
  b = check_int("batch_size", batch_size, 1)
  return n // b if _check_bool("drop_remainder", drop_remainder) else -(-n // b)


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
  """Returns N, the shared leading size; errors name the keys and shapes."""
  if not isinstance(arrays, Mapping) or not arrays:
    raise ValueError(f"arrays must be a non-empty dict of arrays, got {type(arrays).__name__}")
  clash = [k for k in RESERVED_KEYS if k in arrays]
  if clash:
    raise ValueError(f"arrays must not contain the keys {clash}: batches() adds them")
  shapes = {k: np.shape(v) for k, v in arrays.items()}
  if any(len(s) == 0 for s in shapes.values()):
    raise ValueError(f"every array needs a leading example axis [N,...], got shapes {shapes}")
  sizes = {s[0] for s in shapes.values()}
  if len(sizes) != 1:
    raise ValueError(f"arrays must share the leading size N, got shapes {shapes}")
  return sizes.pop()


def shard_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """Rows [lo, hi) of shard ``index`` of ``count`` near-equal contiguous shards of N rows."""
  n = check_int("num_examples", num_examples, 0)
  c = check_int("shard count", count, 1)
  i = check_int("shard index", index, 0)
  if i >= c:
    raise ValueError(f"shard index must be in [0, {c}), got {i}")
  return i * n // c, (i + 1) * n // c


def epoch_order(num_examples: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool,
                lengths: np.ndarray | None = None, bucket_window: int = 100,
                stream: int = 0) -> np.ndarray:
  """The example order of one epoch, [N] int64; a function of (seed, epoch) only.

  With `lengths` [N], examples are bucketed: the full batches' examples are cut
  into windows of `bucket_window` batches, each window is sorted by length (so a
  batch holds similar lengths and padding shrinks) and the full batches are then
  shuffled.  The last N mod B examples are a random draw kept at the end, so
  dropping the remainder does not favour any length.  ``stream`` > 0 draws an
  independent order (one per data shard; 0 is the unsharded order).
  """
  n = check_int("num_examples", num_examples, 0)
  b = check_int("batch_size", batch_size, 1)
  key = [check_int("seed", seed, 0), check_int("epoch", epoch, 0), check_int("stream", stream, 0)]
  shuffle = _check_bool("shuffle", shuffle)
  rng = np.random.default_rng(key if key[2] else key[:2])  # stream 0: the unsharded order
  order = rng.permutation(n) if shuffle else np.arange(n)
  if lengths is None:
    return order
  lengths = np.asarray(lengths)
  if lengths.shape != (n,):
    raise ValueError(f"lengths must have shape [N]=({n},), got {lengths.shape}")
  w = b * check_int("bucket_window", bucket_window, 1)
  n_full = (n // b) * b
  head, tail = order[:n_full], order[n_full:]
  # Stable sort keeps the shuffled order among equal lengths.
  head = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                         for c in np.split(head, range(w, n_full, w))])
  rows = head.reshape(-1, b)
  if shuffle:
    rows = rows[rng.permutation(len(rows))]
  return np.concatenate([rows.reshape(-1), tail])


def batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int, epoch: int,
            shuffle: bool, drop_remainder: bool, process_index: int = 0,
            process_count: int = 1, start_batch: int = 0, bucket_by_length: bool = False,
            bucket_window: int = 100, trim_to_multiple: int | None = None, stream: int = 0
            ) -> Iterator[dict[str, np.ndarray]]:
  """Iterates over one epoch of `arrays` in global batches of `batch_size`.

  Args:
    arrays: dict of arrays sharing the leading size N, e.g. from `load`:
      inputs [N,T,D] or [N,T], labels [N] / [N,T] / [N,K], mask [N,T].
    batch_size: the GLOBAL batch size B; must be divisible by `process_count`.
    seed, epoch: the only sources of the order (ints >= 0).
    shuffle: permute the examples; False keeps the array order.
    drop_remainder: drop the last partial batch; else pad it to B rows with weight 0.
      Padding rows are copies of real examples, so every value is finite and
      every mask row is non-empty.
    process_index, process_count: this process keeps rows
      [process_index*B/process_count, (process_index+1)*B/process_count) of each global batch.
    start_batch: index of the first global batch to yield (resume mid-epoch);
      the batches before it are skipped without being gathered.
    bucket_by_length: group similar lengths (each row's last valid step + 1,
      from `arrays["mask"]`) into batches within windows of `bucket_window`
      batches; see `epoch_order`.
    trim_to_multiple: if set, cut the time axis of every array whose leading
      dims equal the mask's [N,T] after the global batch's last valid step,
      rounded up to this multiple (fewer padded steps, few distinct shapes).
      Any mask pattern keeps all its valid steps (padding rows' too).  With a
      "label_mask" (seq2seq), "decoder_inputs", "labels" and "label_mask" keep
      their own length.
    stream: selects an independent epoch order (see `epoch_order`).

  Yields:
    dict with the keys of `arrays`, each [b,...] with b = B/process_count, plus
    "weight" [b] float32 (1 real, 0 padding) and "example_id" [b] int32, the
    row's position in the epoch order (global batch index * B + row).

  Raises ValueError at the call, not at the first `next`, for bad arguments; the
  flags `shuffle`, `drop_remainder` and `bucket_by_length` must be bools (Python or
  NumPy), not other truthy values.
  """
  n = _check_arrays(arrays)
  b = check_int("batch_size", batch_size, 1)
  shuffle = _check_bool("shuffle", shuffle)
  drop_remainder = _check_bool("drop_remainder", drop_remainder)
  bucket_by_length = _check_bool("bucket_by_length", bucket_by_length)
  pc = check_int("process_count", process_count, 1)
  if b % pc:
    raise ValueError(f"batch_size ({b}) must be divisible by process_count ({pc})")
  pi = check_int("process_index", process_index, 0)
  if pi >= pc:
    raise ValueError(f"process_index must be in [0, {pc}), got {pi}")
  total = num_batches(n, b, drop_remainder)
  start = check_int("start_batch", start_batch, 0)
  if start > total:
    raise ValueError(f"start_batch must be in [0, {total}] (batches per epoch for N={n}, "
                     f"batch_size={b}), got {start}")
  mask = arrays.get("mask")
  needs_lengths = bucket_by_length or trim_to_multiple is not None
  if needs_lengths and (mask is None or np.ndim(mask) != 2):
    raise ValueError("bucket_by_length and trim_to_multiple need arrays['mask'] [N,T], got "
                     f"{None if mask is None else np.shape(mask)}")
  if trim_to_multiple is not None:
    check_int("trim_to_multiple", trim_to_multiple, 1)
  lengths = _ends(mask) if needs_lengths else None
  order = epoch_order(n, b, seed=seed, epoch=epoch, shuffle=shuffle,
                      lengths=lengths if bucket_by_length else None, bucket_window=bucket_window,
                      stream=stream)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  # A seq2seq set's target side has its own time axis, even when as long as the source's.
  target = ("decoder_inputs", "labels", "label_mask") if "label_mask" in arrays else ()
  timed = [k for k, v in arrays.items() if mask is not None and k not in target
           and v.ndim >= 2 and v.shape[:2] == np.shape(mask)]
  return _iterate(arrays, order, b, pi, pc, start, total, lengths, timed, trim_to_multiple)


def _ends(mask) -> np.ndarray:
  """Per row, one past the last valid step (0 for an empty row): the length for prefix
  masks, and what trimming must keep for any other pattern (left padding, holes)."""
  m = np.asarray(mask, bool)
  return np.where(m.any(1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)


def _iterate(arrays, order, b, pi, pc, start, total, lengths, timed, multiple):
  local = b // pc
  rows = slice(pi * local, (pi + 1) * local)
  for k in range(start, total):
    idx = order[k * b:(k + 1) * b]
    real = len(idx)
    if real < b:
      idx = np.concatenate([idx, np.resize(order, b - real)])  # cyclic copies as padding
    out = {}
    keep_t = None
    if multiple is not None:
      # Over the padding rows too: cut to the real rows' length, a padding row's
      # mask could end up empty (left padding, holes), which `batches` promises not.
      longest = max(int(lengths[idx].max()), 1)
      keep_t = -(-longest // multiple) * multiple
    for key, v in arrays.items():
      part = v[idx[rows]]
      if keep_t is not None and key in timed:
        part = part[:, :keep_t]
      out[key] = part
    out["weight"] = (np.arange(b) < real).astype(np.float32)[rows]
    out["example_id"] = (k * b + np.arange(b, dtype=np.int64))[rows].astype(np.int32)
    yield out


def sharded_batches(shards: Mapping[int, Mapping[str, np.ndarray]], batch_size: int, *,
                    num_shards: int, seed: int, epoch: int, shuffle: bool, num_batches: int,
                    start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of each global batch when the split is read in shards.

  The split is cut into ``num_shards`` shards (`shard_bounds`); shard s is
  read only by the process that owns it and has its own epoch order, drawn
  from (seed, epoch, s).  Global batch k is the concatenation, over s in
  order, of B/S rows of shard s, so a process owning the contiguous shards
  ``shards`` yields exactly its contiguous slice of every global batch, and a
  run's batches do not depend on how many processes share the shards.

  Args:
    shards: {shard index: arrays} for the shards this process holds (each a
      dict of arrays sharing a leading size, as from `load(..., shard=...)`);
      the indices must be contiguous.
    batch_size: the GLOBAL batch size B, divisible by ``num_shards``.
    num_shards: S, the number of shards of the whole split.
    num_batches: global batches per epoch, at most min over all S shards of
      N_s // (B/S); every process must pass the same value.
    start_batch: first global batch to yield (resume mid-epoch).

  Yields:
    dict of [len(shards)·B/S, ...] arrays with "weight" (all 1: the remainder
    of each shard is dropped) and "example_id", the row's position in the
    global batch sequence (k·B + s·B/S + row), as `batches` gives.

  Raises ValueError at the call, not at the first `next`, for bad arguments.
  """
  s_count = check_int("num_shards", num_shards, 1)
  b = check_int("batch_size", batch_size, 1)
  if b % s_count:
    raise ValueError(f"batch_size ({b}) must be divisible by num_shards ({s_count})")
  ids = sorted(shards)
  if not ids or ids != list(range(ids[0], ids[0] + len(ids))) or ids[-1] >= s_count:
    raise ValueError(f"shards must be contiguous indices in [0, {s_count}), got {ids}")
  per = b // s_count
  total = check_int("num_batches", num_batches, 0)
  for s in ids:
    have = _check_arrays(shards[s]) // per
    if have < total:
      raise ValueError(f"num_batches={total} exceeds shard {s}'s {have} batches of {per} rows")
  start = check_int("start_batch", start_batch, 0)
  if start > total:
    raise ValueError(f"start_batch must be in [0, {total}], got {start}")
  iters = [batches(shards[s], per, seed=seed, epoch=epoch, shuffle=shuffle, drop_remainder=True,
                   start_batch=start_batch, stream=s + 1) for s in ids]
  return _concat_shards(iters, ids, b, per, start, total)


def _concat_shards(iters, ids, b, per, start, total):
  for k in range(start, total):
    parts = []
    for s, it in zip(ids, iters):
      part = next(it)
      part["example_id"] = (k * b + s * per + np.arange(per)).astype(np.int32)
      parts.append(part)
    yield {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
