"""Independent float64 NumPy GRU, written from the founding document's equations literally.

Each gate is a matrix W_g [H, H+D] acting on the concatenation [h, x]; nothing
here shares code with gru_jax.
"""
import numpy as np


def _sig(a):
  return 1.0 / (1.0 + np.exp(-a))


def concat_weights(params):
  """GRUParams -> {g: (W_g [H,H+D], W_gx/W_gh blocks, b_x_g, b_h_g)} in float64."""
  w_x, w_h, b_x, b_h = (np.asarray(a, np.float64) for a in params)
  hsz = w_h.shape[0]
  out = {}
  for i, g in enumerate("zrh"):
    sl = slice(i * hsz, (i + 1) * hsz)
    out[g] = (np.concatenate([w_h[:, sl].T, w_x[:, sl].T], axis=1), b_x[sl], b_h[sl])
  return out


def step(params, h, x, variant="seed", rec_mask=None):
  """One step for a single example: h [H], x [D] -> (h', z, r, h̃).

  ``rec_mask`` [H]: variational recurrent dropout, h⊙rec_mask in every matmul
  (the update still blends h itself).
  """
  w = concat_weights(params)
  hsz = h.shape[0]
  hd = h if rec_mask is None else h * np.asarray(rec_mask, np.float64)
  hx = np.concatenate([hd, x])
  z = _sig(w["z"][0] @ hx + w["z"][1] + w["z"][2])
  r = _sig(w["r"][0] @ hx + w["r"][1] + w["r"][2])
  wh = w["h"][0]
  if variant == "seed":
    cand = np.tanh(wh @ np.concatenate([r * hd, x]) + w["h"][1] + w["h"][2])
  else:  # reset after the recurrent matmul, its bias inside the product
    cand = np.tanh(wh[:, hsz:] @ x + w["h"][1] + r * (wh[:, :hsz] @ hd + w["h"][2]))
  h_new = (1 - z) * h + z * cand
  return h_new, z, r, cand


def run(params, xs, h0=None, mask=None, reverse=False, variant="seed"):
  """xs [B,T,D] -> (h_last [B,H], hs [B,T,H]) by explicit Python loops over examples and steps.

  Each example's valid steps (mask True) are run in order (or reversed) and
  outputs written at their own positions; masked positions output zeros.
  """
  xs = np.asarray(xs, np.float64)
  bsz, t, _ = xs.shape
  hsz = np.asarray(params[1]).shape[0]
  hs = np.zeros((bsz, t, hsz))
  h_last = np.zeros((bsz, hsz))
  for b in range(bsz):
    h = np.zeros(hsz) if h0 is None else np.asarray(h0[b], np.float64)
    steps = [s for s in range(t) if mask is None or mask[b, s]]
    for s in (reversed(steps) if reverse else steps):
      h = step(params, h, xs[b, s], variant)[0]
      hs[b, s] = h
    h_last[b] = h
  return h_last, hs


def run_segments(params, xs, h0=None, mask=None, resets=None, reverse=False, variant="seed"):
  """`run` for sequences cut into independent segments at ``resets`` [B,T] (segment starts).

  Each example's valid steps are grouped by segment (a reset at step t starts
  a new segment at t, whether or not t is valid) and every segment is run on
  its own: from h0 if nothing separates it from where h0 enters (the start
  forwards, the end with ``reverse``), else from zeros.  h_last is the state
  after the last step run, or h0 if no step is valid.
  """
  xs = np.asarray(xs, np.float64)
  bsz, t, _ = xs.shape
  hsz = np.asarray(params[1]).shape[0]
  resets = np.zeros((bsz, t), bool) if resets is None else np.asarray(resets, bool)
  hs = np.zeros((bsz, t, hsz))
  h_last = np.zeros((bsz, hsz))
  for b in range(bsz):
    start = np.zeros(hsz) if h0 is None else np.asarray(h0[b], np.float64)
    segments = {}  # segment number -> its valid steps in time order
    for s in range(t):
      number = int(resets[b, :s + 1].sum())
      if mask is None or mask[b, s]:
        segments.setdefault(number, []).append(s)
    h_enters = int(resets[b].sum()) if reverse else 0  # the segment h0 belongs to
    h = start
    for number in sorted(segments, reverse=reverse):
      h = start if number == h_enters else np.zeros(hsz)
      steps = segments[number]
      for s in (reversed(steps) if reverse else steps):
        h = step(params, h, xs[b, s], variant)[0]
        hs[b, s] = h
    h_last[b] = h
  return h_last, hs
