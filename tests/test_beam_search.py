"""`models.beam_search` against known answers: exhaustive enumeration of every target
sequence, scored by the teacher-forced model in float64; greedy decoding at K = 1."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gru_jax import models


def _model(num_outputs, seed=0, b=2, s=5, attention="none"):
  rs = np.random.RandomState(seed)
  src = jnp.asarray(rs.randint(1, 9, (b, s)), jnp.int32)
  mask = jnp.arange(s)[None] < jnp.array([s, 2, 4, 1][:b])[:, None]
  model = models.Seq2Seq(9, num_outputs, hidden_sizes=(8, 6), embed_dim=5, attention=attention)
  v = model.init(jax.random.key(seed), src, mask, decoder_inputs=jnp.zeros((b, 2), jnp.int32))
  # Spread the output layer so that sequences differ clearly in probability.
  v["params"]["head"]["kernel"] = v["params"]["head"]["kernel"] * 3
  return model, v, src, mask


@functools.cache
def _forced(model):
  return jax.jit(lambda v, src, mask, dec: model.apply(v, src, mask, decoder_inputs=dec))


def _log_prob(model, v, src, mask, row, seq, bos):
  """Summed float64 log-softmax of seq's tokens from the teacher-forced logits."""
  dec = jnp.asarray([[bos] + list(seq[:-1])], jnp.int32)
  logits = np.asarray(_forced(model)(v, src[row:row + 1], mask[row:row + 1], dec),
                      np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                         keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return float(sum(logp[t, tok] for t, tok in enumerate(seq)))


def _all_sequences(num_outputs, eos, max_len):
  """Every output a decoder can give: up to and including <eos>, or max_len tokens."""
  others = [t for t in range(num_outputs) if t != eos]
  for n in range(1, max_len + 1):
    for head in itertools.product(others, repeat=n - 1):
      yield head + (eos,)
  yield from itertools.product(others, repeat=max_len)


@pytest.mark.parametrize("length_penalty,attention", [(0.0, "none"), (0.8, "none"),
                                                      (0.8, "additive"),
                                                      (0.0, "multiplicative")])
def test_a_beam_as_wide_as_all_prefixes_is_exhaustive_search(length_penalty, attention):
  v_size, eos, bos, pad, max_len = 3, 2, 0, 0, 3
  model, v, src, mask = _model(v_size, attention=attention)
  seqs = list(_all_sequences(v_size, eos, max_len))
  assert len(seqs) == 15
  k = v_size ** max_len  # more beams than prefixes at every step
  toks, scores = models.beam_search(model, v, src, mask, beam_size=k, max_len=max_len,
                                    bos_id=bos, eos_id=eos, pad_id=pad,
                                    length_penalty=length_penalty)
  assert toks.shape == (2, k, max_len) and scores.shape == (2, k)
  for row in range(2):
    want = sorted(((_log_prob(model, v, src, mask, row, s, bos)
                    / ((5 + len(s)) / 6) ** length_penalty, s) for s in seqs), reverse=True)
    got = np.asarray(scores[row])
    assert np.isfinite(got[:15]).all() and np.isneginf(got[15:]).all()
    np.testing.assert_allclose(got[:15], [w for w, _ in want], atol=1e-5)
    for i, (_, s) in enumerate(want):  # the same sequence at each rank, padded after <eos>
      assert tuple(np.asarray(toks[row, i])) == s + (pad,) * (max_len - len(s)), (row, i)


def test_one_beam_is_greedy_decoding_and_scores_are_the_sequences_log_probs():
  model, v, src, mask = _model(7, seed=1)
  probe = models.greedy_decode(model, v, src, mask, max_len=6, bos_id=1, eos_id=-1)
  eos = int(probe[0, 3])  # a token these weights emit, so beams finish early
  greedy = models.greedy_decode(model, v, src, mask, max_len=6, bos_id=1, eos_id=eos)
  toks, scores = models.beam_search(model, v, src, mask, beam_size=1, max_len=6, bos_id=1,
                                    eos_id=eos)
  np.testing.assert_array_equal(toks[:, 0], greedy)
  toks, scores = jax.jit(lambda s, m: models.beam_search(
      model, v, s, m, beam_size=4, max_len=6, bos_id=1, eos_id=eos))(src, mask)
  assert (np.diff(np.asarray(scores), axis=1) <= 0).all()  # best first
  assert (np.asarray(toks) == eos).any()
  for row in range(2):
    for beam in range(4):
      seq = list(np.asarray(toks[row, beam]))
      if eos in seq:
        seq = seq[:seq.index(eos) + 1]
        assert (np.asarray(toks[row, beam, len(seq):]) == 0).all()
      np.testing.assert_allclose(scores[row, beam],
                                 _log_prob(model, v, src, mask, row, seq, 1), atol=1e-4)
  # The best of 4 beams is at least as probable as the greedy sequence here.
  greedy_scores = [_log_prob(model, v, src, mask, r, list(np.asarray(greedy[r]))[
      :list(np.asarray(greedy[r])).index(eos) + 1] if eos in list(np.asarray(greedy[r]))
      else list(np.asarray(greedy[r])), 1) for r in range(2)]
  assert (np.asarray(scores[:, 0]) >= np.asarray(greedy_scores) - 1e-5).all()


def test_bad_arguments_are_refused():
  model, v, src, mask = _model(5)
  ok = dict(beam_size=2, max_len=3, bos_id=1, eos_id=2)
  for bad, match in ((dict(beam_size=0), "beam_size"), (dict(max_len=0), "max_len"),
                     (dict(bos_id=5), "bos_id"), (dict(length_penalty=float("nan")),
                                                  "length_penalty must be a finite number")):
    with pytest.raises(ValueError, match=match):
      models.beam_search(model, v, src, mask, **(ok | bad))


def _lm(vocab, seed=0):
  model = models.SequenceModel(task="lm", vocab_size=vocab, num_outputs=vocab,
                               hidden_sizes=(8, 6), embed_dim=5, dropout=0.0)
  v = model.init(jax.random.key(seed), jnp.zeros((1, 3), jnp.int32))
  v["params"]["head"]["kernel"] = v["params"]["head"]["kernel"] * 3
  return model, v


def _lm_log_prob(model, v, prompt, seq):
  """float64 summed log-softmax of seq after prompt, from the whole sequence's logits."""
  full = jnp.asarray([list(prompt) + list(seq)], jnp.int32)
  logits = np.asarray(model.apply(v, full), np.float64)[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  p = len(prompt)
  return float(sum(logp[p - 1 + t, tok] for t, tok in enumerate(seq)))


@pytest.mark.parametrize("length_penalty,prompt_len", [(0.0, 3), (0.8, 1)])
def test_lm_beam_as_wide_as_all_continuations_is_exhaustive_search(length_penalty, prompt_len):
  vocab, eos, pad, length = 3, 2, 0, 3
  model, v = _lm(vocab)
  prompts = jnp.asarray([[1, 0, 1][:prompt_len], [0, 0, 2][:prompt_len]], jnp.int32)
  seqs = list(_all_sequences(vocab, eos, length))
  k = vocab ** length
  toks, scores = models.beam_search_lm(model, v, prompts, length, beam_size=k, eos_id=eos,
                                       pad_id=pad, length_penalty=length_penalty)
  assert toks.shape == (2, k, prompt_len + length) and scores.shape == (2, k)
  for row in range(2):
    prompt = tuple(np.asarray(prompts[row]))
    want = sorted(((_lm_log_prob(model, v, prompt, s) / ((5 + len(s)) / 6) ** length_penalty, s)
                   for s in seqs), reverse=True)
    got = np.asarray(scores[row])
    np.testing.assert_allclose(got[:15], [w for w, _ in want], atol=1e-5)
    assert np.isneginf(got[15:]).all()
    for i, (_, s) in enumerate(want):
      assert tuple(np.asarray(toks[row, i])) == prompt + s + (pad,) * (length - len(s))


def test_lm_one_beam_is_the_argmax_continuation_and_a_1d_prompt_stays_1d():
  model, v = _lm(7, seed=2)
  prompt = jnp.asarray([3, 1, 4, 1], jnp.int32)
  toks, scores = models.beam_search_lm(model, v, prompt, 6, beam_size=1)
  assert toks.shape == (1, 10) and scores.shape == (1,)
  seq = np.asarray(toks[0])
  np.testing.assert_array_equal(seq[:4], prompt)
  logits = np.asarray(model.apply(v, jnp.asarray(seq[None, :-1])))[0]
  np.testing.assert_array_equal(seq[4:], logits[3:].argmax(-1))
  np.testing.assert_allclose(scores[0], _lm_log_prob(model, v, tuple(seq[:4]), seq[4:]),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="beam_search_lm needs a model with task='lm'"):
    models.beam_search_lm(models.SequenceModel(num_outputs=3, task="classification"), v, prompt, 2, beam_size=2)
  with pytest.raises(ValueError, match=r"prompt must be token ids in \[0, 7\), got \[9\]"):
    models.beam_search_lm(model, v, jnp.asarray([1, 9]), 2, beam_size=2)
  with pytest.raises(ValueError, match="length must be an int >= 1, got 0"):
    models.beam_search_lm(model, v, prompt, 0, beam_size=2)


def test_sample_speed_script_times_beam_search_beside_sampling():
  """experiments/sample_speed.py's beam rows: one per beam count and one for sample_lm,
  each with a first-call and a median time (a smoke test of the script, not of speed)."""
  import re
  from experiments import sample_speed
  model, v = _lm(5)
  rows = sample_speed.beam_rows(model, v, jnp.asarray([1, 2], jnp.int32), 4, beams=(1, 2))
  assert [r.split(":")[0] for r in rows] == ["length 4 beam_search_lm 1 beams",
                                             "length 4 beam_search_lm 2 beams",
                                             "length 4 sample_lm"]
  assert all(re.search(r"first call \d+\.\d\d s, then median \d+\.\d{3} s$", r) for r in rows)
