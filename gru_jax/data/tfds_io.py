"""Preparing TFDS builders and reading a whole split into NumPy arrays."""
from __future__ import annotations

import inspect
import socket

import numpy as np
import tensorflow_datasets as tfds

from gru_jax.data.base import DataUnavailableError
from gru_jax.data.pipeline import shard_bounds

# Rows per tf.data batch while reading; any size works, this one keeps few Python steps.
_READ_CHUNK = 8192


PROBE_TIMEOUT_S = 10


def _downloads_for_real() -> bool:
  """Whether `download_and_prepare` is TFDS's own, not tfds.testing.mock_data's stand-in
  (which needs no network).  Told by the defining module, not by identity with a copy
  taken at import: this module may first be imported inside a mock_data block."""
  # getattr_static: the attribute is a wrapper that binds anew on each access.
  method = inspect.getattr_static(tfds.core.DatasetBuilder, "download_and_prepare")
  return getattr(method, "__module__", None) == tfds.core.DatasetBuilder.__module__


def _unreachable(host: tuple[str, int]) -> str | None:
  """Why ``(name, port)`` cannot be reached now (a failed DNS lookup fails at once), or None."""
  try:
    socket.create_connection(host, timeout=PROBE_TIMEOUT_S).close()
    return None
  except OSError as e:
    return f"{type(e).__name__}: {e}"


def prepare(builder, *, local: bool, host: tuple[str, int] | None = None):
  """Runs `download_and_prepare` once per data_dir; local builders never touch the network.

  A public dataset not yet prepared under its data_dir is downloaded from ``host``
  ((name, port)); when that host cannot be reached this fails at once, instead of after
  TFDS's minutes of retries.
  """
  config = tfds.download.DownloadConfig(try_download_gcs=False) if local else None
  def unavailable(why):
    return DataUnavailableError(
        f"could not prepare TFDS dataset {builder.name!r} in data_dir={str(builder.data_dir_root)!r}: "
        f"{why}. It needs internet the first time; prepare it on a connected "
        "machine (tfds build, or gru_jax.data.load there) and point data_dir or "
        "$GRU_JAX_DATA_DIR at the copy.")
  if not local and host is not None and not builder.is_prepared() and _downloads_for_real():
    why = _unreachable(host)
    if why is not None:
      raise unavailable(f"it is not prepared there and {host[0]} is unreachable ({why})")
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # noqa: BLE001 -- re-raised with the fix the user needs.
    if local:
      raise
    raise unavailable(f"{type(e).__name__}: {e}") from e
  return builder


def read_split(builder, split: str, shard: tuple[int, int] | None = None
               ) -> dict[str, np.ndarray]:
  """Every example of `split` as NumPy arrays [N,...]; with ``shard=(i, S)``
  only rows `shard_bounds(N, i, S)` of it, read as the TFDS slice "split[lo:hi]"
  (TFDS then opens only the files holding those rows).

  Reads in finite batches rather than `batch_size=-1`: under
  `tfds.testing.mock_data` the split sizes are unknown, and -1 then asks
  tf.data for a batch of sys.maxsize rows.
  """
  if shard is not None:
    lo, hi = shard_rows(builder, split, shard)
    if lo == hi:  # more shards than rows: an empty part of the partition (TFDS refuses it)
      return {k: np.zeros((0, *(d or 0 for d in t.shape)), t.numpy_dtype)
              for k, t in builder.info.features.get_tensor_info().items()}
    split = f"{split}[{lo}:{hi}]"
  chunks = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=_READ_CHUNK)))
  if not chunks:
    raise ValueError(f"TFDS split {split!r} of {builder.name!r} is empty")
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def split_size(builder, split: str) -> int | None:
  """The recorded size of a TFDS split, or None when unknown (e.g. mocked data)."""
  info = builder.info.splits.get(split) if builder.info.splits else None
  return int(info.num_examples) if info is not None and info.num_examples else None


def shard_rows(builder, split: str, shard: tuple[int, int]) -> tuple[int, int]:
  """[lo, hi) of shard ``shard=(i, S)`` of a TFDS split (`shard_bounds` of its size)."""
  n = split_size(builder, split)
  if n is None:  # unknown (mocked data): count the examples, the one case that reads them all
    n = sum(1 for _ in builder.as_dataset(split=split))
  return shard_bounds(n, *shard)
