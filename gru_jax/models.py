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

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gru_jax import attention as attention_lib
from gru_jax import layers
from gru_jax.cell import check_int

Array = jax.Array
TASKS = ("classification", "tagging", "regression", "lm")


class SequenceModel(nn.Module):
  """GRU stack with the seed's batch norm and dropout, and a dense head.

  Inputs: ``inputs`` [B,T,D] float or [B,T] int tokens (needs ``vocab_size``),
  ``mask`` [B,T] bool.  Output: [B,num_outputs] for "classification" and
  "regression" (read from each sequence's last valid step), [B,T,num_outputs]
  for "tagging" and "lm".

  State: ``initial_states`` holds one entry per GRU layer, [B,H_i] (None:
  zeros) or with ``bidirectional`` a (forward, backward) pair; with
  ``return_states`` the call returns ``(outputs, states)``, each layer's final
  state(s) in that form.  In eval mode (``train=False``: batch norm on its
  running averages, no dropout) a sequence run in pieces, each piece starting
  from the states the one before returned, gives the whole run's outputs;
  `sample_lm` decodes that way.

  ``zoneout``: each GRU layer's zoneout rate (`layers.GRU`); ``gru_eval_mode``
  runs the GRU layers as in evaluation (no dropout of their own, zoneout's
  expectation) even with ``train=True``, for batch-norm re-estimation.
  """
  task: str
  num_outputs: int
  hidden_sizes: Sequence[int] = (128, 128)
  batch_norm: bool = True
  dropout: float = 0.5
  input_dropout: float = 0.0
  recurrent_dropout: float = 0.0
  zoneout: float = 0.0
  gru_eval_mode: bool = False
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
               example_ids: Array | None = None, initial_states=None,
               return_states: bool = False):
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
    if not self.hidden_sizes:  # else the head would read the inputs, per step: [B,T,K]
      raise ValueError("SequenceModel needs at least one hidden size")
    if self.task == "lm" and self.bidirectional:
      raise ValueError("task='lm' predicts each next token from the ones before it; a "
                       "bidirectional model would read the tokens it predicts")
    inputs, mask = layers.as_arrays(inputs, mask)  # lists and NumPy arrays, as the layers take
    if self.vocab_size is not None:
      if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(f"a model with vocab_size expects int tokens [B,T], got "
                         f"{inputs.dtype} {inputs.shape}")
      check_token_range("inputs", inputs, self.vocab_size)
      x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(inputs)
    else:
      if inputs.ndim != 3:
        raise ValueError(f"expected float inputs [B,T,D], got shape {inputs.shape}")
      x = inputs.astype(jnp.float32)
    per_step = self.task in ("tagging", "lm")
    gru_kw = dict(variant=self.variant, dropout=self.input_dropout,
                  recurrent_dropout=self.recurrent_dropout, zoneout=self.zoneout,
                  unroll=self.unroll, compute_dtype=self.compute_dtype,
                  remat_chunk=self.remat_chunk, backend=self.backend)
    n = len(self.hidden_sizes)
    h0 = layers.stacked_initial_states("SequenceModel", initial_states, self.hidden_sizes,
                                       self.bidirectional, x.shape[0], "initial_states")
    states = []
    for i, size in enumerate(self.hidden_sizes):
      seq = per_step or i < n - 1
      if self.bidirectional:
        layer = layers.Bidirectional(size, return_sequences=seq, return_state=True,
                                     gru_kwargs=gru_kw, name=f"gru_{i}")
      else:
        layer = layers.GRU(size, return_sequences=seq, return_state=True, name=f"gru_{i}",
                           **gru_kw)
      x, state = layer(x, mask, h0[i], deterministic=not train or self.gru_eval_mode,
                       example_ids=example_ids)
      states.append(state)
      if self.batch_norm:
        x = layers.SequenceBatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                     axis_name=self.axis_name, name=f"bn_{i}")(
                                         x, mask if seq else None, use_running_average=not train)
      x = layers.SequenceDropout(self.dropout, name=f"dropout_{i}")(
          x, deterministic=not train, example_ids=example_ids)
    out = nn.Dense(self.num_outputs, name="head")(x)
    return (out, tuple(states)) if return_states else out


def check_token_range(name: str, tokens, size: int) -> None:
  """Raises if concrete int ``tokens`` fall outside [0, size), padding included.

  nn.Embed gives NaN rows for such ids, which would surface as silent garbage
  (NaN logits, argmax 0).  Traced values cannot be read, so under jit the caller
  is trusted, as in the training step.
  """
  # Traced, or spread over other hosts (not readable here): trust the caller.
  if isinstance(tokens, jax.core.Tracer) or not getattr(tokens, "is_fully_addressable", True):
    return
  # NumPy, not jnp: inside a jit trace jnp would stage even a concrete array.
  t = np.asarray(tokens)
  bad = t[(t < 0) | (t >= size)]
  if bad.size:
    raise ValueError(f"{name} must be token ids in [0, {size}), got "
                     f"{sorted(set(bad.tolist()))[:10]}")


def filter_logits(logits: Array, top_k: int | None = None, top_p: float | None = None) -> Array:
  """logits [...,V] with every token outside the top-k, then outside the nucleus, at -inf.

  ``top_k``: keep the k largest (ties with the k-th kept too).  ``top_p``: of those,
  keep the fewest most probable tokens whose probability (renormalised over the kept
  ones) sums to at least p (Holtzman et al. 2020); the most probable token always stays.
  """
  neg = jnp.asarray(-jnp.inf, logits.dtype)
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None and (isinstance(top_p, jax.core.Tracer) or top_p < 1.0):
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    # A sorted token is kept while the mass before it is still short of p.
    before = jnp.cumsum(probs, axis=-1) - probs
    cut = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cut, neg, logits)
  return logits


def _check_number(name: str, value, ok: Callable[[Any], bool], want: str) -> None:
  """A ValueError naming ``name`` unless ``ok(value)``; traced values pass unchecked."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    good = bool(ok(value))
  except TypeError:
    good = False
  if not good:
    raise ValueError(f"{name} must be {want}, got {value!r}")


def check_sampling(temperature, top_k, top_p) -> int | None:
  """Checks the sampling options; returns ``top_k`` as an int (or None)."""
  _check_number("temperature", temperature, lambda t: np.isfinite(t) and t > 0,
                "> 0 and finite (small values approach greedy decoding)")
  _check_number("top_p", top_p, lambda q: q is None or 0 < q <= 1, "None or a number in (0, 1]")
  return None if top_k is None else check_int("top_k", top_k, 1)


def _lm_prompt(name: str, model: SequenceModel, prompt) -> tuple[Array, bool]:
  """(prompt as int32 [B,P], whether it came as [P]), after checking the model and prompt."""
  if model.task != "lm":
    raise ValueError(f"{name} needs a model with task='lm', got {model.task!r}")
  if model.vocab_size is None:
    raise ValueError(f"{name} needs a token model (vocab_size set): it feeds each "
                     "generated token back as the next input")
  prompt = jnp.asarray(prompt)
  if prompt.ndim not in (1, 2) or prompt.shape[-1] < 1 or prompt.shape[0] < 1:
    raise ValueError(f"prompt must be a non-empty [P] or [B,P] token array, got shape "
                     f"{prompt.shape}")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must hold int tokens, got dtype {prompt.dtype}")
  check_token_range("prompt", prompt, model.vocab_size)
  return prompt.astype(jnp.int32).reshape(-1, prompt.shape[-1]), prompt.ndim == 1


def sample_lm(model: SequenceModel, variables, prompt: Array, length: int, rng: Array, *,
              temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None) -> Array:
  """Samples ``length`` tokens after ``prompt`` [P] (or [B,P]) from an "lm" model.

  Returns [P+length] (or [B,P+length], each row drawn independently).  Each token is
  drawn from softmax(logits / temperature), restricted to the ``top_k`` most probable
  tokens and then to the nucleus of mass ``top_p`` if given (`filter_logits`);
  ``temperature`` is a number > 0 and finite (checked unless traced), and as it shrinks
  the draw becomes the greedy argmax (the logits are shifted by their maximum first,
  so even a denormal temperature cannot overflow them into ties).  ``prompt``: int
  tokens (a JAX or NumPy array, or a list).  The prompt runs once; then each token is
  one GRU step from the carried states (``initial_states``/``return_states``), in eval
  mode, so O(P + length) steps in all, and the logits are the whole sequence's in
  eval mode.
  """
  prompt, unbatched = _lm_prompt("sample_lm", model, prompt)
  length = check_int("length", length, 0)
  top_k = check_sampling(temperature, top_k, top_p)
  b, p = prompt.shape
  run = functools.partial(model.apply, variables, train=False, return_states=True)
  logits, states = run(prompt)
  buf = jnp.zeros((b, p + length), jnp.int32).at[:, :p].set(prompt)

  def draw(key, logits):  # logits [B,V] -> tokens [B]
    # Shifted so the top logit is 0: logits / T alone overflows to +inf for small T,
    # and categorical then picks the lowest-indexed of the tied tokens, not the top one.
    logits = filter_logits((logits - jnp.max(logits, -1, keepdims=True)) / temperature,
                           top_k, top_p)
    if unbatched:  # one [V] draw, so a [P] prompt's tokens do not depend on the batching
      return jax.random.categorical(key, logits[0])[None]
    return jax.random.categorical(key, logits, axis=-1)

  def body(t, carry):
    buf, logits, states, rng = carry
    rng, sub = jax.random.split(rng)
    tok = draw(sub, logits).astype(jnp.int32)
    logits, states = run(tok[:, None], initial_states=states)
    return buf.at[:, t].set(tok), logits[:, 0], states, rng

  buf, *_ = jax.lax.fori_loop(p, p + length, body, (buf, logits[:, -1], states, rng))
  return buf[0] if unbatched else buf


def beam_search_lm(model: SequenceModel, variables, prompt: Array, length: int, *,
                   beam_size: int, eos_id: int = -1, pad_id: int = 0,
                   length_penalty: float = 0.0) -> tuple[Array, Array]:
  """The ``beam_size`` most probable continuations of ``prompt`` [P] (or [B,P]) from an
  "lm" model: (tokens [K,P+length] (or [B,K,P+length]), scores [K] (or [B,K])), best first.

  `beam_search`'s loop (`beam_search_with`) on the language model: the prompt but
  its last token runs once, then each step is one GRU step from the carried states,
  in eval mode, starting from the prompt's last token.  ``scores``: the summed
  log-probabilities of the generated tokens, divided by Wu et al.'s length penalty
  (see `beam_search`); a beam that emits ``eos_id`` (-1: never) is finished and padded
  with ``pad_id``.  One beam is greedy decoding.
  """
  prompt, unbatched = _lm_prompt("beam_search_lm", model, prompt)
  length = check_int("length", length, 1)
  if model.num_outputs != model.vocab_size:
    raise ValueError(f"beam_search_lm feeds each predicted token back as input, so "
                     f"num_outputs ({model.num_outputs}) must equal vocab_size "
                     f"({model.vocab_size})")
  run = functools.partial(model.apply, variables, train=False, return_states=True)

  def step(_, states, prev):
    logits, states = run(prev[:, None], initial_states=states)
    return logits[:, 0], states

  # The prompt but its last token (none: T = 0, the zero states); the last is the first input.
  start = lambda inputs, _: (None, run(inputs[:, :-1])[1])
  toks, scores = beam_search_with(start, step, model.num_outputs, prompt, None,
                                  beam_size=beam_size, max_len=length, bos_id=prompt[:, -1],
                                  eos_id=eos_id, pad_id=pad_id, length_penalty=length_penalty)
  k = toks.shape[1]
  toks = jnp.concatenate([jnp.repeat(prompt[:, None], k, axis=1), toks], -1)
  return (toks[0], scores[0]) if unbatched else (toks, scores)


ATTENTIONS = ("none", "additive", "multiplicative")


attend = attention_lib.attend  # the masked softmax and context, as `gru_jax.attention.attend`


class _Kernel(nn.Module):
  """A bias-free `nn.Dense`'s kernel [in,features], same name and init, as an array."""
  features: int

  @nn.compact
  def __call__(self, in_features: int) -> Array:
    return self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features))


class _CellParams(layers.GRUCell):
  """A `layers.GRUCell`'s params (same fields, names and init), as a `GRUParams`."""

  @nn.compact
  def __call__(self, input_size: int):  # pylint: disable=arguments-differ
    return layers.gru_params(self, input_size)


class AttentionDecoder(nn.Module):
  """The attention decoder's parameters, run by `gru_jax.attention.decode`.

  Params: ``query`` / ``energy`` kernels [H,A] and [A,1] ("additive" only) and
  one `layers.GRUCell`'s params per layer, ``decoder_{i}`` (layer 0 reads
  [embedding, context], E + C wide).  ``__call__(states, embedded [B,L,E],
  memory [B,S,C], keys [B,S,A], mask [B,S], output_drops, recurrent_masks, zoneout)``
  returns `decode`'s (states, outputs [B,L,H], contexts [B,L,C], α [B,L,S]).
  """
  hidden_sizes: Sequence[int]
  attention_size: int
  variant: str = "seed"
  kind: str = "additive"
  compute_dtype: Any = None
  unroll: int = 1

  @nn.compact
  def __call__(self, states, embedded, memory, keys, mask, output_drops=None,
               recurrent_masks=None, zoneout=None):
    w_query = v = None
    if self.kind == "additive":
      w_query = _Kernel(self.attention_size, name="query")(self.hidden_sizes[-1])
      v = _Kernel(1, name="energy")(self.attention_size)[:, 0]
    cells, width = [], embedded.shape[-1] + memory.shape[-1]
    for i, size in enumerate(self.hidden_sizes):
      cells.append(_CellParams(size, self.variant, name=f"decoder_{i}")(width))
      width = size
    return attention_lib.decode(
        cells, states, embedded, memory, keys, mask, kind=self.kind, variant=self.variant,
        w_query=w_query, v=v, output_drops=output_drops, recurrent_masks=recurrent_masks,
        zoneout=zoneout, compute_dtype=self.compute_dtype, unroll=self.unroll)


def _check_tokens(name: str, tokens: Array) -> None:
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"Seq2Seq: {name} must be int tokens of rank 2, got {tokens.dtype} "
                     f"{tokens.shape}")


def check_seq2seq_source(inputs: Array, mask: Array | None, vocab_size: int) -> None:
  """A seq2seq model's source checks (Linen and NNX): int tokens [B,S] in [0, vocab_size),
  mask [B,S] or None."""
  _check_tokens("inputs", inputs)
  if mask is not None and mask.shape != inputs.shape:
    raise ValueError(f"Seq2Seq: mask must have shape [B,S]={inputs.shape}, got {mask.shape}")
  check_token_range("Seq2Seq: inputs", inputs, vocab_size)


def check_seq2seq_target(inputs: Array, decoder_inputs: Array, num_outputs: int) -> None:
  """A seq2seq model's teacher-forcing checks: int decoder_inputs [B,L] in
  [0, num_outputs), with the batch size of inputs [B,S]."""
  _check_tokens("decoder_inputs", decoder_inputs)
  check_token_range("Seq2Seq: decoder_inputs", decoder_inputs, num_outputs)
  if decoder_inputs.shape[0] != inputs.shape[0]:
    raise ValueError(f"Seq2Seq: decoder_inputs {decoder_inputs.shape} and inputs "
                     f"{inputs.shape} must share the batch size")


class Seq2Seq(nn.Module):
  """GRU encoder–decoder (Cho et al. 2014, the paper that introduced the GRU).

  The encoder reads source tokens ``inputs`` [B,S] (valid where ``mask`` [B,S])
  through ``len(hidden_sizes)`` GRU layers (optionally bidirectional); the
  context c [B,C] is the top layer's final state (both directions' final
  states, concatenated).  Decoder layer i starts from tanh(Dense_i(c)); every
  decoder step reads [embed(y_{t-1}), c], and the output layer reads
  [h_t, embed(y_{t-1}), c], as in Cho et al.  ``__call__`` is the
  teacher-forced pass: ``decoder_inputs`` [B,L] (<bos> then the target) give
  logits [B,L,num_outputs]; `greedy_decode` generates step by step with the
  same parameters (`start`, `step`).

  With ``attention="additive"`` (Bahdanau et al. 2015, whose RNNsearch is a GRU
  encoder–decoder) or ``"multiplicative"`` (Luong et al. 2015's "general"
  score) the decoder instead reads, at every step, a context c_t that attends
  over all the encoder outputs (`AttentionDecoder`, `gru_jax.attention.decode`):
  layer 0 reads [embed(y_{t-1}), c_t] and the output layer [h_t,
  embed(y_{t-1}), c_t].  The decoder then runs step by step (a `lax.scan`,
  each step rematerialised in the backward pass; ``compute_dtype`` applies
  to it too, ``backend`` and ``remat_chunk`` to the encoder); its attention
  weights α [B,L,S] are sown as ``intermediates/attention`` (`attention_weights`).

  Attributes:
    vocab_size: source vocabulary.  num_outputs: target vocabulary.
    hidden_sizes: GRU sizes, encoder and decoder alike.
    dropout: when training, on both embeddings, between encoder layers and after
      every decoder layer (the top one's output feeds the output layer).
    attention: "none" (Cho et al.'s fixed context), "additive" or "multiplicative".
    attention_size: A, the width of the additive attention's hidden layer (None:
      the top decoder layer's size, which multiplicative attention always uses).
    zoneout: every GRU layer's zoneout rate, encoder and decoder, with or without
      attention (`layers.GRU`); decoding (`step`) runs evaluation's expectation.
    other fields: as `SequenceModel`, passed to every GRU.
  """
  vocab_size: int
  num_outputs: int
  hidden_sizes: Sequence[int] = (128,)
  embed_dim: int = 64
  bidirectional: bool = False
  dropout: float = 0.0
  recurrent_dropout: float = 0.0
  variant: str = "seed"
  unroll: int = 1
  compute_dtype: Any = None
  remat_chunk: int | None = None
  backend: str = "auto"
  task: str = "seq2seq"
  attention: str = "none"
  attention_size: int | None = None
  zoneout: float = 0.0

  def setup(self):
    if self.task != "seq2seq":
      raise ValueError(f"Seq2Seq has task 'seq2seq', got {self.task!r}")
    if not self.hidden_sizes:
      raise ValueError("Seq2Seq needs at least one hidden size")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"Seq2Seq: attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if self.attention_size is not None:
      check_int("Seq2Seq: attention_size", self.attention_size, 1)
      if self.attention == "multiplicative" and self.attention_size != self.hidden_sizes[-1]:
        raise ValueError(f"Seq2Seq: multiplicative attention scores against the top decoder "
                         f"state, so attention_size must be None or {self.hidden_sizes[-1]}, "
                         f"got {self.attention_size}")
    kw = dict(variant=self.variant, recurrent_dropout=self.recurrent_dropout,
              unroll=self.unroll, compute_dtype=self.compute_dtype,
              remat_chunk=self.remat_chunk, backend=self.backend, return_state=True,
              zoneout=self.zoneout)
    self.src_embed = nn.Embed(self.vocab_size, self.embed_dim)
    self.tgt_embed = nn.Embed(self.num_outputs, self.embed_dim)
    self.encoder = [
        tuple(layers.GRU(size, reverse=rev, **kw)
              for rev in ((False, True) if self.bidirectional else (False,)))
        for size in self.hidden_sizes]
    self.bridge = [nn.Dense(size) for size in self.hidden_sizes]
    if self.attention == "none":
      self.decoder = [layers.GRU(size, **kw) for size in self.hidden_sizes]
    else:
      size = self.attention_size or self.hidden_sizes[-1]
      self.attention_keys = nn.Dense(size, use_bias=self.attention == "additive")
      self.attention_decoder = AttentionDecoder(
          tuple(self.hidden_sizes), size, self.variant, self.attention,
          compute_dtype=self.compute_dtype, unroll=self.unroll)
    self.drop = layers.SequenceDropout(self.dropout)
    self.head = nn.Dense(self.num_outputs)

  def start(self, inputs: Array, mask: Array | None = None, *, train: bool = False,
            example_ids: Array | None = None):
    """Encodes inputs [B,S] -> (context, initial decoder states, one [B,H_i] per layer).

    The context is c [B,C], or with attention the tuple (c, encoder outputs [B,S,C],
    attention keys [B,S,A], mask [B,S]); `step` takes it as it is.
    """
    inputs, mask = layers.as_arrays(inputs, mask)
    check_seq2seq_source(inputs, mask, self.vocab_size)
    det = not train
    x = self.drop(self.src_embed(inputs), deterministic=det, example_ids=example_ids)
    for i, grus in enumerate(self.encoder):
      outs = [g(x, mask, deterministic=det, example_ids=example_ids) for g in grus]
      x = jnp.concatenate([o[0] for o in outs], -1)
      context = jnp.concatenate([o[1] for o in outs], -1)
      if i < len(self.encoder) - 1:
        x = self.drop(x, deterministic=det, example_ids=example_ids)
    states = tuple(jnp.tanh(d(context)) for d in self.bridge)
    if self.attention != "none":
      valid = jnp.ones(inputs.shape, bool) if mask is None else mask.astype(bool)
      context = (context, x, self.attention_keys(x), valid)
    return context, states

  def _decode(self, context, states, prev_tokens, det, example_ids):
    """prev_tokens [B,L] from states (one [B,H_i] per layer) -> (logits [B,L,V], new states)."""
    e = self.drop(self.tgt_embed(prev_tokens), deterministic=det, example_ids=example_ids)
    if self.attention != "none":
      return self._attend_decode(context, states, e, det, example_ids)
    c = jnp.broadcast_to(context[:, None], e.shape[:2] + context.shape[-1:])
    x = jnp.concatenate([e, c], -1)
    new = []
    for gru, h0 in zip(self.decoder, states):
      x, h = gru(x, None, h0, deterministic=det, example_ids=example_ids)
      new.append(h)
      x = self.drop(x, deterministic=det, example_ids=example_ids)
    return self.head(jnp.concatenate([x, e, c], -1)), tuple(new)

  def _attend_decode(self, context, states, e, det, example_ids):
    """`_decode` with attention: embedded previous tokens e [B,L,E]."""
    _, memory, keys, mask = context
    # Dropout as without attention (after every layer, a fresh draw per step, and the
    # GRUs' recurrent mask fixed over time), drawn before the loop.
    drops, rec = layers.decoder_dropout_masks(
        lambda: self.make_rng("dropout"), self.dropout, self.recurrent_dropout, det,
        e.shape[0], e.shape[1], self.hidden_sizes, example_ids, e.dtype)
    zo = layers.decoder_zoneout(lambda: self.make_rng("dropout"), self.zoneout, det, e,
                                self.hidden_sizes, example_ids)
    new, x, c, alpha = self.attention_decoder(tuple(states), e, memory, keys, mask, drops, rec,
                                              zo)
    self.sow("intermediates", "attention", alpha)
    return self.head(jnp.concatenate([x, e, c.astype(e.dtype)], -1)), tuple(new)

  def step(self, context: Array, states: tuple, prev_token: Array):
    """One decoding step: prev_token [B] -> (logits [B,V], new states); no dropout."""
    logits, states = self._decode(context, states, prev_token[:, None], True, None)
    return logits[:, 0], states

  def __call__(self, inputs: Array, mask: Array | None = None, *, decoder_inputs: Array,
               train: bool = False, example_ids: Array | None = None) -> Array:
    """Teacher-forced logits [B,L,num_outputs] for decoder_inputs [B,L] given inputs [B,S]."""
    inputs, decoder_inputs = layers.as_arrays(inputs, decoder_inputs)
    check_seq2seq_target(inputs, decoder_inputs, self.num_outputs)
    context, states = self.start(inputs, mask, train=train, example_ids=example_ids)
    return self._decode(context, states, decoder_inputs, not train, example_ids)[0]


def _linen_search_fns(model: Seq2Seq, variables):
  """(start(inputs, mask), step(context, states, prev)) of a Linen `Seq2Seq` and its
  variables, for `greedy_decode_with` and `beam_search_with`."""
  return (lambda inputs, mask: model.apply(variables, inputs, mask, method=Seq2Seq.start),
          lambda context, states, prev: model.apply(variables, context, states, prev,
                                                    method=Seq2Seq.step))


def _token_ids(num_outputs: int, max_len, bos_id, eos_id, pad_id) -> tuple[int, Any, int, int]:
  """The checked ids; ``bos_id`` an int, or (for `beam_search_lm`) int32 tokens [B]."""
  if isinstance(bos_id, jax.Array) and bos_id.ndim == 1:
    check_token_range("bos_id", bos_id, num_outputs)
  else:
    bos_id = check_int("bos_id", bos_id, 0, num_outputs, "num_outputs")
  return (check_int("max_len", max_len, 1), bos_id,
          check_int("eos_id", eos_id, -1, num_outputs, "num_outputs"),
          check_int("pad_id", pad_id, 0, num_outputs, "num_outputs"))


def greedy_decode_with(start: Callable, step: Callable, num_outputs: int, inputs: Array,
                       mask: Array | None = None, *, max_len: int, bos_id: int, eos_id: int,
                       pad_id: int = 0) -> Array:
  """`greedy_decode` for any encoder–decoder given as functions: ``start(inputs [B,S],
  mask)`` -> (context, states) and ``step(context, states, prev_token [B])`` ->
  (logits [B,num_outputs], states) (the NNX `gru_jax.nnx_models.Seq2Seq` uses it)."""
  max_len, bos_id, eos_id, pad_id = _token_ids(num_outputs, max_len, bos_id, eos_id, pad_id)
  inputs = jnp.asarray(inputs)
  mask = None if mask is None else jnp.asarray(mask)
  context, states = start(inputs, mask)

  def body(carry, _):
    states, prev, done = carry
    logits, states = step(context, states, prev)
    tok = jnp.where(done, pad_id, jnp.argmax(logits, -1).astype(jnp.int32))
    return (states, tok, done | (tok == eos_id)), tok

  b = inputs.shape[0]
  init = (states, jnp.full((b,), bos_id, jnp.int32), jnp.zeros((b,), bool))
  _, toks = jax.lax.scan(body, init, None, length=max_len)
  return toks.T


def greedy_decode(model: Seq2Seq, variables, inputs: Array, mask: Array | None = None, *,
                  max_len: int, bos_id: int, eos_id: int, pad_id: int = 0) -> Array:
  """Greedy decoding: inputs [B,S] -> tokens [B,max_len], <eos> included, then pad_id.

  One compiled loop of `Seq2Seq.step` calls, O(max_len) steps.  ``bos_id`` and
  ``pad_id`` are target tokens in [0, num_outputs); ``eos_id`` too, or -1 to
  never stop early.
  """
  return greedy_decode_with(*_linen_search_fns(model, variables), model.num_outputs, inputs,
                            mask, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def attention_weights(model: Seq2Seq, variables, inputs: Array, mask: Array | None = None, *,
                      decoder_inputs: Array) -> Array:
  """The attention weights α [B,L,S] of an attention `Seq2Seq`, teacher-forced on
  decoder_inputs [B,L] (<bos> then the target, or a decoded output shifted right):
  α[b,t,j] is how much target step t read source step j; 0 on padding."""
  if model.attention == "none":
    raise ValueError("attention_weights needs a Seq2Seq with attention, got attention='none'")
  _, state = model.apply(variables, inputs, mask, decoder_inputs=decoder_inputs,
                         mutable=["intermediates"])
  return state["intermediates"]["attention"][0]


def decode(model: Seq2Seq, variables, inputs: Array, mask: Array | None = None, *,
           beam_size: int = 1, length_penalty: float = 0.0, **kw) -> Array:
  """The decoded tokens [B,max_len]: `greedy_decode` at one beam, else `beam_search`'s
  best beam (``kw``: max_len, bos_id, eos_id, pad_id)."""
  if check_int("beam_size", beam_size, 1) == 1:
    return greedy_decode(model, variables, inputs, mask, **kw)
  return beam_search(model, variables, inputs, mask, beam_size=beam_size,
                     length_penalty=length_penalty, **kw)[0][:, 0]


def beam_search(model: Seq2Seq, variables, inputs: Array, mask: Array | None = None, *,
                beam_size: int, max_len: int, bos_id: int, eos_id: int, pad_id: int = 0,
                length_penalty: float = 0.0) -> tuple[Array, Array]:
  """Beam search: inputs [B,S] -> (tokens [B,K,max_len], scores [B,K]), best first.

  Keeps the ``beam_size`` (K) most probable prefixes at every step, ranked by
  their summed log-probabilities; a prefix that emits ``eos_id`` is finished:
  it keeps its score and is padded with ``pad_id`` (<eos> included, as in
  `greedy_decode`).  ``scores`` are the summed log-probabilities divided by
  Wu et al.'s (2016) length penalty ((5 + len) / 6) ** length_penalty, with
  len the tokens up to and including <eos>; the penalty ranks the K finished
  beams (0: no penalty).  K = 1 is greedy decoding; a K as large as the number
  of prefixes is exhaustive search.  A row with fewer than K prefixes (e.g. K >
  num_outputs at the first step) fills the rest with score -inf.  One
  compiled loop of `Seq2Seq.step` calls on B·K rows.
  """
  return beam_search_with(*_linen_search_fns(model, variables), model.num_outputs, inputs,
                          mask, beam_size=beam_size, max_len=max_len, bos_id=bos_id,
                          eos_id=eos_id, pad_id=pad_id, length_penalty=length_penalty)


def beam_search_with(start: Callable, step: Callable, num_outputs: int, inputs: Array,
                     mask: Array | None = None, *, beam_size: int, max_len: int, bos_id: int,
                     eos_id: int, pad_id: int = 0, length_penalty: float = 0.0
                     ) -> tuple[Array, Array]:
  """`beam_search` for any encoder–decoder given as ``start`` and ``step`` functions
  (as `greedy_decode_with`); ``bos_id`` may also be int32 tokens [B], one per row."""
  beam_size = check_int("beam_size", beam_size, 1)
  max_len, bos_id, eos_id, pad_id = _token_ids(num_outputs, max_len, bos_id, eos_id, pad_id)
  try:
    ok = bool(np.isfinite(length_penalty)) and not isinstance(length_penalty, bool)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
  inputs = jnp.asarray(inputs)
  mask = None if mask is None else jnp.asarray(mask)
  b, k, v = inputs.shape[0], beam_size, num_outputs
  context, states = start(inputs, mask)
  tile = lambda a: jnp.repeat(a, k, axis=0)  # [B,...] -> [B*K,...], beams of a row adjacent
  context, states = jax.tree.map(tile, context), jax.tree.map(tile, states)
  rows = jnp.arange(b)[:, None]

  def body(carry, t):
    states, prev, score, done, length, toks = carry
    logits, states = step(context, states, prev.reshape(-1))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, k, v)
    # A finished beam has one continuation, at no cost: column 0, written as pad_id below.
    finished = jnp.full((v,), -jnp.inf).at[0].set(0.0)
    cand = score[..., None] + jnp.where(done[..., None], finished, logp)
    score, flat = jax.lax.top_k(cand.reshape(b, k * v), k)
    beam, tok = flat // v, (flat % v).astype(jnp.int32)
    was_done = done[rows, beam]
    tok = jnp.where(was_done, pad_id, tok)
    states = jax.tree.map(
        lambda s: s.reshape((b, k) + s.shape[1:])[rows, beam].reshape(s.shape), states)
    toks = toks[rows, beam].at[..., t].set(tok)
    length = jnp.where(was_done, length[rows, beam], t + 1)
    return (states, tok, score, was_done | (tok == eos_id), length, toks), None

  score0 = jnp.full((b, k), -jnp.inf).at[:, 0].set(0.0)  # one live prefix: <bos>
  first = jnp.broadcast_to(jnp.asarray(bos_id, jnp.int32)[..., None], (b, k))
  init = (states, first, score0, jnp.zeros((b, k), bool),
          jnp.zeros((b, k), jnp.int32), jnp.full((b, k, max_len), pad_id, jnp.int32))
  (_, _, score, _, length, toks), _ = jax.lax.scan(body, init, jnp.arange(max_len))
  score = score / ((5.0 + length) / 6.0) ** length_penalty
  order = jnp.argsort(-score, axis=-1)
  return toks[rows, order], score[rows, order]
