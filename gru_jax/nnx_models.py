"""Models for Flax NNX, built from `gru_jax.nnx_layers`.

`Seq2Seq` is the Linen `gru_jax.models.Seq2Seq` (Cho et al. 2014's GRU
encoder–decoder, optionally with Bahdanau or Luong attention) as an
`nnx.Module`: the same computation and the same parameter tree, so
`Seq2Seq.from_params` loads a trained Linen model's ``variables["params"]``.
`greedy_decode` and `beam_search` run the Linen search loops on it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gru_jax import layers as linen_layers
from gru_jax import models as linen_models
from gru_jax import nnx_layers
from gru_jax.cell import check_int

Array = jax.Array


class Seq2Seq(nnx.Module):
  """GRU encoder–decoder for NNX, as `gru_jax.models.Seq2Seq`.

  The encoder reads source tokens [B,S] (valid where ``mask`` [B,S]) through
  ``len(hidden_sizes)`` GRU layers (bidirectional if asked); its top layer's
  final state c (both directions', concatenated) starts decoder layer i at
  tanh(bridge_i(c)).  Without attention every decoder step reads [embed(y_{t-1}),
  c] and the output layer [h_t, embed(y_{t-1}), c]; with ``attention`` the
  decoder is `nnx_layers.AttentionDecoder`, which reads a context c_t attending
  over all encoder outputs instead of c.

  Args:
    vocab_size: source vocabulary.  num_outputs: target vocabulary.
    hidden_sizes: GRU sizes, encoder and decoder alike.  embed_dim: both embeddings'.
    bidirectional: the encoder runs both directions at every layer.
    dropout: in training, on both embeddings, between encoder layers and after
      every decoder layer; recurrent_dropout, zoneout: every GRU's (`nnx_layers.GRU`).
    variant, unroll, compute_dtype, remat_chunk, backend: every GRU's.
    attention: "none", "additive" or "multiplicative"; attention_size: A for
      "additive" (None: the top decoder size).
    deterministic: no dropout or zoneout draws; ``model.eval()`` / ``model.train()``.
    rngs: ``params`` for the weights, ``dropout`` for the masks.

  Params, named as the Linen model's: ``src_embed``, ``tgt_embed``,
  ``encoder_{i}_{d}`` (d = 0 forwards, 1 backwards), ``bridge_{i}``,
  ``decoder_{i}`` (no attention) or ``attention_keys`` and ``attention_decoder``,
  and ``head``.
  """

  def __init__(self, vocab_size: int, num_outputs: int, hidden_sizes: Sequence[int] = (128,),
               embed_dim: int = 64, *, bidirectional: bool = False, dropout: float = 0.0,
               recurrent_dropout: float = 0.0, zoneout: float = 0.0, variant: str = "seed",
               unroll: int = 1, compute_dtype: Any = None, remat_chunk: int | None = None,
               backend: str = "auto", attention: str = "none",
               attention_size: int | None = None, deterministic: bool = False,
               rngs: nnx.Rngs):
    check_int("Seq2Seq: vocab_size", vocab_size, 1)
    check_int("Seq2Seq: num_outputs", num_outputs, 1)
    if not hidden_sizes:
      raise ValueError("Seq2Seq needs at least one hidden size")
    if attention not in linen_models.ATTENTIONS:
      raise ValueError(f"Seq2Seq: attention must be one of {linen_models.ATTENTIONS}, got "
                       f"{attention!r}")
    self.vocab_size, self.num_outputs = vocab_size, num_outputs
    self.hidden_sizes, self.bidirectional = tuple(hidden_sizes), bidirectional
    self.attention = attention
    gru = dict(variant=variant, recurrent_dropout=recurrent_dropout, zoneout=zoneout,
               unroll=unroll, compute_dtype=compute_dtype, remat_chunk=remat_chunk,
               backend=backend, return_state=True, deterministic=deterministic, rngs=rngs)
    self.src_embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
    self.tgt_embed = nnx.Embed(num_outputs, embed_dim, rngs=rngs)
    width = embed_dim
    for i, size in enumerate(self.hidden_sizes):
      for d in range(2 if bidirectional else 1):
        setattr(self, f"encoder_{i}_{d}", nnx_layers.GRU(width, size, reverse=d == 1, **gru))
      width = size * (2 if bidirectional else 1)
    memory = width  # the encoder's outputs and its final state c are this wide
    for i, size in enumerate(self.hidden_sizes):
      setattr(self, f"bridge_{i}", nnx.Linear(memory, size, rngs=rngs))
    top = self.hidden_sizes[-1]
    if attention == "none":
      width = embed_dim + memory
      for i, size in enumerate(self.hidden_sizes):
        setattr(self, f"decoder_{i}", nnx_layers.GRU(width, size, **gru))
        width = size
    else:
      size = attention_size or top
      self.attention_keys = nnx.Linear(memory, size, use_bias=attention == "additive",
                                       rngs=rngs)
      self.attention_decoder = nnx_layers.AttentionDecoder(
          embed_dim, memory, self.hidden_sizes, kind=attention, attention_size=attention_size,
          variant=variant, dropout=dropout, recurrent_dropout=recurrent_dropout,
          zoneout=zoneout, compute_dtype=compute_dtype, unroll=unroll,
          deterministic=deterministic, rngs=rngs)
    self.drop = nnx_layers.SequenceDropout(dropout, deterministic=deterministic, rngs=rngs)
    self.head = nnx.Linear(top + embed_dim + memory, num_outputs, rngs=rngs)

  @classmethod
  def from_params(cls, params: Mapping[str, Any], vocab_size: int, num_outputs: int, *,
                  rngs: nnx.Rngs | None = None, **kwargs) -> Seq2Seq:
    """A model holding a Linen `gru_jax.models.Seq2Seq`'s ``variables["params"]``.

    ``vocab_size``, ``num_outputs`` and ``kwargs`` are the constructor's
    arguments, as the Linen model was built (its sizes, ``bidirectional``,
    ``attention``...); every param is checked against the tree they make, by
    name and shape.  ``rngs`` is needed only for dropout or zoneout.
    """
    drops = any(kwargs.get(k, 0) > 0 for k in ("dropout", "recurrent_dropout", "zoneout"))
    if drops and rngs is None:
      raise ValueError("from_params with dropout or zoneout needs rngs=nnx.Rngs(...)")
    model = cls(vocab_size, num_outputs, rngs=rngs or nnx.Rngs(0), **kwargs)
    want = {tuple(map(str, path)): v[...].shape for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param)}
    flat = [(tuple(str(k.key) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(dict(params))[0]]
    got = {path for path, _ in flat}
    if set(want) != got:
      name = lambda paths: sorted("/".join(p) for p in paths)
      raise ValueError(f"params do not match a Seq2Seq built with these arguments: missing "
                       f"{name(set(want) - got)}, unexpected {name(got - set(want))}")
    for path, leaf in flat:
      if tuple(jnp.shape(leaf)) != tuple(want[path]):
        raise ValueError(f"params {'/'.join(path)} has shape {jnp.shape(leaf)}, expected "
                         f"{want[path]}")
      owner = model
      for k in path[:-1]:
        owner = getattr(owner, k)
      setattr(owner, path[-1], nnx.Param(jnp.asarray(leaf)))
    return model

  def start(self, inputs: Array, mask: Array | None = None, *, deterministic: bool | None = None,
            example_ids: Array | None = None, rngs: nnx.Rngs | None = None):
    """Encodes inputs [B,S] -> (context, initial decoder states, one [B,H_i] per layer);
    with attention the context is (c, encoder outputs [B,S,C], keys [B,S,A], mask [B,S])."""
    inputs, mask = linen_layers.as_arrays(inputs, mask)
    linen_models.check_seq2seq_source(inputs, mask, self.vocab_size)
    kw = dict(deterministic=deterministic, example_ids=example_ids, rngs=rngs)
    x = self.drop(self.src_embed(inputs), **kw)
    for i in range(len(self.hidden_sizes)):
      outs = [getattr(self, f"encoder_{i}_{d}")(x, mask, **kw)
              for d in range(2 if self.bidirectional else 1)]
      x = jnp.concatenate([o[0] for o in outs], -1)
      context = jnp.concatenate([o[1] for o in outs], -1)
      if i < len(self.hidden_sizes) - 1:
        x = self.drop(x, **kw)
    states = tuple(jnp.tanh(getattr(self, f"bridge_{i}")(context))
                   for i in range(len(self.hidden_sizes)))
    if self.attention != "none":
      valid = jnp.ones(inputs.shape, bool) if mask is None else mask.astype(bool)
      context = (context, x, self.attention_keys(x), valid)
    return context, states

  def decode(self, context, states, prev_tokens: Array, *, deterministic: bool | None = None,
             example_ids: Array | None = None, rngs: nnx.Rngs | None = None,
             return_attention: bool = False):
    """prev_tokens [B,L] from `start`'s (context, states) -> (logits [B,L,V], new states),
    plus the attention weights α [B,L,S] with ``return_attention``."""
    kw = dict(deterministic=deterministic, example_ids=example_ids, rngs=rngs)
    e = self.drop(self.tgt_embed(prev_tokens), **kw)
    if self.attention != "none":
      _, memory, keys, mask = context
      new, x, c, alpha = self.attention_decoder(tuple(states), e, memory, keys, mask, **kw)
      logits = self.head(jnp.concatenate([x, e, c.astype(e.dtype)], -1))
      return (logits, tuple(new)) + ((alpha,) if return_attention else ())
    if return_attention:
      raise ValueError("return_attention needs a Seq2Seq with attention, got attention='none'")
    c = jnp.broadcast_to(context[:, None], e.shape[:2] + context.shape[-1:])
    x, new = jnp.concatenate([e, c], -1), []
    for i, h0 in enumerate(states):
      x, h = getattr(self, f"decoder_{i}")(x, None, h0, **kw)
      new.append(h)
      x = self.drop(x, **kw)
    return self.head(jnp.concatenate([x, e, c], -1)), tuple(new)

  def step(self, context, states, prev_token: Array):
    """One decoding step: prev_token [B] -> (logits [B,V], new states); no dropout."""
    logits, states = self.decode(context, states, prev_token[:, None], deterministic=True)
    return logits[:, 0], states

  def __call__(self, inputs: Array, mask: Array | None = None, *, decoder_inputs: Array,
               deterministic: bool | None = None, example_ids: Array | None = None,
               rngs: nnx.Rngs | None = None) -> Array:
    """Teacher-forced logits [B,L,num_outputs] for decoder_inputs [B,L] given inputs [B,S]."""
    inputs, decoder_inputs = linen_layers.as_arrays(inputs, decoder_inputs)
    linen_models.check_seq2seq_target(inputs, decoder_inputs, self.num_outputs)
    kw = dict(deterministic=deterministic, example_ids=example_ids, rngs=rngs)
    context, states = self.start(inputs, mask, **kw)
    return self.decode(context, states, decoder_inputs, **kw)[0]


def _fns(model: Seq2Seq):
  return (lambda inputs, mask: model.start(inputs, mask, deterministic=True), model.step)


def greedy_decode(model: Seq2Seq, inputs: Array, mask: Array | None = None, *, max_len: int,
                  bos_id: int, eos_id: int, pad_id: int = 0) -> Array:
  """`gru_jax.models.greedy_decode` for the NNX `Seq2Seq`: tokens [B,max_len]."""
  return linen_models.greedy_decode_with(*_fns(model), model.num_outputs, inputs, mask,
                                         max_len=max_len, bos_id=bos_id, eos_id=eos_id,
                                         pad_id=pad_id)


def beam_search(model: Seq2Seq, inputs: Array, mask: Array | None = None, *, beam_size: int,
                max_len: int, bos_id: int, eos_id: int, pad_id: int = 0,
                length_penalty: float = 0.0) -> tuple[Array, Array]:
  """`gru_jax.models.beam_search` for the NNX `Seq2Seq`: (tokens [B,K,max_len], scores [B,K])."""
  return linen_models.beam_search_with(*_fns(model), model.num_outputs, inputs, mask,
                                       beam_size=beam_size, max_len=max_len, bos_id=bos_id,
                                       eos_id=eos_id, pad_id=pad_id,
                                       length_penalty=length_penalty)
