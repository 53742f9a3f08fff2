"""Character n-gram baselines for language models: interpolated Witten-Bell.

A GRU language model should beat the classical smoothed n-gram on the same
characters.  Witten-Bell interpolation (Witten & Bell 1991; Chen & Goodman
1998, eq. 16) needs no tuned constants:

    P_k(c | h) = (C(h c) + U(h) P_{k-1}(c | h')) / (C(h) + U(h))

where h is the k-1 preceding characters, h' drops its oldest one, C counts in
the training text, and U(h) is the number of distinct characters seen after h
(P_k = P_{k-1} when h was never seen).  P_0 is uniform over the vocabulary, so
every character, unseen ones included, keeps a non-zero probability.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np


class WittenBell:
  """Interpolated Witten-Bell character model of orders 1..`order` over ids [0, vocab_size)."""

  def __init__(self, train_ids: Sequence[int], order: int, vocab_size: int):
    if order < 1 or vocab_size < 1:
      raise ValueError(f"order and vocab_size must be >= 1, got {order}, {vocab_size}")
    self.order, self.vocab_size = order, vocab_size
    ids = tuple(int(i) for i in train_ids)
    # counts[k][h] -> Counter of the character after context h (a tuple of k ids).
    self.counts = [collections.defaultdict(collections.Counter) for _ in range(order)]
    for t, c in enumerate(ids):
      for k in range(min(order, t + 1)):
        self.counts[k][ids[t - k:t]][c] += 1
    # Totals and distinct-follower counts, once per context rather than per query.
    self.totals = [{h: (sum(n.values()), len(n)) for h, n in level.items()}
                   for level in self.counts]

  def probs(self, context: Sequence[int], c: int) -> list[float]:
    """[P_1(c | ...), ..., P_order(c | ...)]: the probability of `c` after `context`
    (its last order-1 ids are used) under each order."""
    context = tuple(int(i) for i in context)
    p, out = 1.0 / self.vocab_size, []
    for k in range(self.order):
      h = context[len(context) - k:] if k else ()
      if len(h) == k and h in self.totals[k]:
        total, distinct = self.totals[k][h]
        p = (self.counts[k][h][c] + distinct * p) / (total + distinct)
      out.append(p)
    return out

  def bits_per_char(self, ids: Sequence[int], start: int = 1) -> list[float]:
    """Mean -log2 P(ids[t] | ids[:t]) over t >= `start`, one value per order 1..order."""
    ids = [int(i) for i in ids]
    if not 0 < start < len(ids):
      raise ValueError(f"start must be in [1, {len(ids)}), got {start}")
    total = np.zeros(self.order)
    for t in range(start, len(ids)):
      total -= np.log2(self.probs(ids[max(0, t - self.order + 1):t], ids[t]))
    return [float(v) for v in total / (len(ids) - start)]
