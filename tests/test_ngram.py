"""gru_jax.data.ngram: interpolated Witten-Bell against hand-computed probabilities."""
import math

import numpy as np
import pytest

from gru_jax.data.ngram import WittenBell


def test_witten_bell_matches_hand_computation():
  # Train "0 1 0 1 2", vocabulary 3.  Order 1: counts 2, 2, 1 of 5, three distinct,
  # P1(c) = (C(c) + 3 * 1/3) / (5 + 3).  Order 2 after "0": "1" twice (one distinct);
  # after "1": "0" and "2" once each (two distinct); "2" never starts a context.
  model = WittenBell([0, 1, 0, 1, 2], order=2, vocab_size=3)
  p1 = [3 / 8, 3 / 8, 2 / 8]
  for c in range(3):
    assert model.probs([], c) == pytest.approx([p1[c], p1[c]])
  assert model.probs([0], 1) == pytest.approx([3 / 8, (2 + 3 / 8) / 3])   # 19/24
  assert model.probs([0], 0) == pytest.approx([3 / 8, (3 / 8) / 3])
  assert model.probs([1], 2) == pytest.approx([2 / 8, (1 + 2 * 2 / 8) / 4])
  assert model.probs([2], 0) == pytest.approx([3 / 8, 3 / 8])              # unseen context
  want = -(math.log2(19 / 24) + math.log2((1 + 2 * 2 / 8) / 4)) / 2
  assert model.bits_per_char([0, 1, 2]) == pytest.approx([-(math.log2(3 / 8) + math.log2(2 / 8))
                                                          / 2, want])


def _brute_force(train, context, c, order, vocab_size):
  """Interpolated Witten-Bell straight from the definition, counting in the text itself."""
  p = 1.0 / vocab_size
  for k in range(order):
    if len(context) < k:
      break
    h = list(context[len(context) - k:]) if k else []
    followers = [train[t] for t in range(k, len(train)) if train[t - k:t] == h]
    if followers:
      p = (followers.count(c) + len(set(followers)) * p) / (len(followers) + len(set(followers)))
  return p


def test_witten_bell_matches_the_definition_at_higher_orders():
  """Orders 3 and 4, where the back-off drops the oldest character of the context."""
  rng = np.random.default_rng(1)
  train = (rng.integers(0, 4, 300) * rng.integers(0, 2, 300)).tolist()  # repetitive: seen contexts
  model = WittenBell(train, order=4, vocab_size=5)
  for _ in range(30):
    context = rng.integers(0, 4, rng.integers(0, 6)).tolist()
    c = int(rng.integers(0, 5))
    want = [_brute_force(train, context, c, k, 5) for k in range(1, 5)]
    np.testing.assert_allclose(model.probs(context, c), want, rtol=1e-12)


def test_witten_bell_is_a_distribution_for_every_context():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 6, 500) % rng.integers(1, 7, 500)  # skewed, some ids rare
  model = WittenBell(train, order=4, vocab_size=7)           # id 6 never seen
  for _ in range(20):
    context = rng.integers(0, 7, rng.integers(0, 5)).tolist()
    total = np.sum([model.probs(context, c) for c in range(7)], axis=0)
    np.testing.assert_allclose(total, np.ones(4), rtol=1e-12)
    assert all(p > 0 for p in model.probs(context, 6))


def test_witten_bell_learns_a_deterministic_sequence():
  """A periodic text is predictable from two characters of context, not from one."""
  text = [0, 1, 0, 2] * 200
  bits = WittenBell(text, order=3, vocab_size=3).bits_per_char([0, 1, 0, 2] * 10)
  assert bits[0] > 1.4          # unigram: about H(1/2, 1/4, 1/4) = 1.5 bits
  assert 0.4 < bits[1] < 0.6    # after "0" the next is "1" or "2": about one bit every 2 chars
  assert bits[2] < 0.05


def test_witten_bell_refuses_bad_arguments():
  with pytest.raises(ValueError, match="order"):
    WittenBell([0, 1], order=0, vocab_size=2)
  with pytest.raises(ValueError, match="start"):
    WittenBell([0, 1], order=1, vocab_size=2).bits_per_char([0])
