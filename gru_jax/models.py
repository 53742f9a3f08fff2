"""Models composed from `gru_jax.layers`.

`SequenceModel` is the founding document's Keras model, generalised:

    [Embed] → (GRU → BatchNorm → Dropout) × len(hidden_sizes) → Dense

With the defaults (two GRU(128), batch norm, dropout 0.5) and
``task="classification"`` it is exactly the seed's
``GRU(128, return_sequences=True) → BN → Dropout(0.5) → GRU(128) → BN →
Dropout(0.5) → Dense(num_classes, softmax)``; with ``task="tagging"`` both
GRUs return sequences, as in the seed's code listing.  The model returns
logits (or regression outputs); the softmax lives in the loss.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gru_jax import layers

Array = jax.Array
TASKS = ("classification", "tagging", "regression", "lm")


class SequenceModel(nn.Module):
  """GRU stack with the seed's batch norm and dropout, and a dense head.

  Inputs: ``inputs`` [B,T,D] float or [B,T] int tokens (needs ``vocab_size``),
  ``mask`` [B,T] bool.  Output: [B,num_outputs] for "classification" and
  "regression" (read from each sequence's last valid step), [B,T,num_outputs]
  for "tagging" and "lm".
  """
  task: str
  num_outputs: int
  hidden_sizes: Sequence[int] = (128, 128)
  batch_norm: bool = True
  dropout: float = 0.5
  input_dropout: float = 0.0
  recurrent_dropout: float = 0.0
  variant: str = "seed"
  bidirectional: bool = False
  vocab_size: int | None = None
  embed_dim: int = 64
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  axis_name: str | None = None
  unroll: int = 1
  compute_dtype: Any = None
  remat_chunk: int | None = None
  backend: str = "auto"

  @nn.compact
  def __call__(self, inputs: Array, mask: Array | None = None, *, train: bool = False,
               example_ids: Array | None = None) -> Array:
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
    if self.vocab_size is not None:
      if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(f"a model with vocab_size expects int tokens [B,T], got "
                         f"{inputs.dtype} {inputs.shape}")
      x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(inputs)
    else:
      if inputs.ndim != 3:
        raise ValueError(f"expected float inputs [B,T,D], got shape {inputs.shape}")
      x = inputs.astype(jnp.float32)
    per_step = self.task in ("tagging", "lm")
    gru_kw = dict(variant=self.variant, dropout=self.input_dropout,
                  recurrent_dropout=self.recurrent_dropout, unroll=self.unroll,
                  compute_dtype=self.compute_dtype, remat_chunk=self.remat_chunk,
                  backend=self.backend)
    n = len(self.hidden_sizes)
    for i, size in enumerate(self.hidden_sizes):
      seq = per_step or i < n - 1
      if self.bidirectional:
        x = layers.Bidirectional(size, return_sequences=seq, gru_kwargs=gru_kw,
                                 name=f"gru_{i}")(x, mask, deterministic=not train,
                                                  example_ids=example_ids)
      else:
        x = layers.GRU(size, return_sequences=seq, name=f"gru_{i}", **gru_kw)(
            x, mask, deterministic=not train, example_ids=example_ids)
      if self.batch_norm:
        x = layers.SequenceBatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                     axis_name=self.axis_name, name=f"bn_{i}")(
                                         x, mask if seq else None, use_running_average=not train)
      x = layers.SequenceDropout(self.dropout, name=f"dropout_{i}")(
          x, deterministic=not train, example_ids=example_ids)
    return nn.Dense(self.num_outputs, name="head")(x)


def sample_lm(model: SequenceModel, variables, prompt: Array, length: int, rng: Array, *,
              temperature: float = 1.0) -> Array:
  """Samples ``length`` tokens after ``prompt`` [P] from an "lm" model. Returns [P+length].

  The model is rerun over a fixed-size masked buffer each step: O(T²) but
  one compiled program, and exactly the function that was trained.
  """
  if model.task != "lm":
    raise ValueError(f"sample_lm needs a model with task='lm', got {model.task!r}")
  if prompt.ndim != 1 or prompt.shape[0] < 1:
    raise ValueError(f"prompt must be a non-empty [P] token array, got shape {prompt.shape}")
  p = prompt.shape[0]
  total = p + length
  buf = jnp.zeros((1, total), jnp.int32).at[0, :p].set(prompt.astype(jnp.int32))

  def body(t, carry):
    buf, rng = carry
    mask = (jnp.arange(total) < t)[None]
    logits = model.apply(variables, buf, mask, train=False)[0, t - 1]
    rng, sub = jax.random.split(rng)
    tok = jax.random.categorical(sub, logits / temperature)
    return buf.at[0, t].set(tok.astype(jnp.int32)), rng

  buf, _ = jax.lax.fori_loop(p, total, body, (buf, rng))
  return buf[0]
