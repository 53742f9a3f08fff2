"""Times `models.sample_lm` against the earlier O(T^2) sampler on a 2x256 character LM.

    python experiments/sample_speed.py

The earlier sampler (copied below) reran the model over a fixed-size masked
buffer at every step; `sample_lm` runs the prompt once and then one GRU step
per token from the carried states.  Prints each one's time (first call
includes compilation; then the median of 3) and the fraction of tokens on
which the two agree for the same key.  Measured on the project's 2-core CPU
VM (2026-11-29): 200 tokens 1.532 s -> 0.015 s, 500 tokens 9.248 s -> 0.043 s,
all tokens equal.  Then `beam_search_lm` at 1, 4 and 8 beams beside `sample_lm`
(2026-11-30: 200 tokens 0.011 / 0.022 / 0.032 s, 500 tokens 0.027 / 0.050 / 0.079 s;
sample_lm 0.013 and 0.031 s).
"""
import time

import jax
import jax.numpy as jnp

from gru_jax import models


def masked_buffer_sample(model, variables, prompt, length, rng, temperature=1.0):
  """The earlier `sample_lm`: the whole buffer [1,P+length] through the model per token."""
  p = prompt.shape[0]
  total = p + length
  buf = jnp.zeros((1, total), jnp.int32).at[0, :p].set(prompt.astype(jnp.int32))

  def body(t, carry):
    buf, rng = carry
    mask = (jnp.arange(total) < t)[None]
    logits = model.apply(variables, buf, mask, train=False)[0, t - 1]
    rng, sub = jax.random.split(rng)
    tok = jax.random.categorical(sub, (logits - jnp.max(logits)) / temperature)
    return buf.at[0, t].set(tok.astype(jnp.int32)), rng
  return jax.lax.fori_loop(p, total, body, (buf, rng))[0][0]


def median_time(run, *args_of_call) -> tuple[float, float]:
  """(first call's seconds, with compilation; median of the next three): call i takes
  ``args_of_call[i]``'s arguments (four tuples)."""
  t0 = time.perf_counter()
  jax.block_until_ready(run(*args_of_call[0]))
  first = time.perf_counter() - t0
  times = []
  for args in args_of_call[1:4]:
    t0 = time.perf_counter()
    jax.block_until_ready(run(*args))
    times.append(time.perf_counter() - t0)
  return first, sorted(times)[1]


def beam_rows(model, variables, prompt, length: int, beams=(1, 4, 8)) -> list[str]:
  """`models.beam_search_lm` timed at each beam count, and `sample_lm` beside it."""
  rows = []
  shifted = [(prompt + i,) for i in range(4)]  # other prompts: nothing is cached
  for k in beams:
    run = jax.jit(lambda p, k=k: models.beam_search_lm(model, variables, p, length,
                                                         beam_size=k))
    first, median = median_time(run, *shifted)
    rows.append(f"length {length} beam_search_lm {k} beams: first call {first:.2f} s, "
                f"then median {median:.3f} s")
  run = jax.jit(lambda p, key: models.sample_lm(model, variables, p, length, key))
  first, median = median_time(run, *[(prompt, jax.random.key(i)) for i in range(4)])
  rows.append(f"length {length} sample_lm: first call {first:.2f} s, then median "
              f"{median:.3f} s")
  return rows


def main():
  model = models.SequenceModel("lm", 96, hidden_sizes=(256, 256), batch_norm=False,
                               vocab_size=96, embed_dim=64)
  v = model.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))
  prompt = jnp.arange(10, dtype=jnp.int32)
  for length in (200, 500):
    runs = {name: jax.jit(lambda k, f=f: f(model, v, prompt, length, k))
            for name, f in (("masked buffer", masked_buffer_sample),
                            ("sample_lm", models.sample_lm))}
    for name, run in runs.items():
      first, median = median_time(run, *[(jax.random.key(1 + i),) for i in range(4)])
      print(f"length {length} {name}: first call {first:.2f} s, then median {median:.3f} s",
            flush=True)
    a, b = (run(jax.random.key(9)) for run in runs.values())
    print(f"length {length}: fraction of equal tokens for the same key: "
          f"{float((a == b).mean()):.3f}")
  for length in (200, 500):
    for row in beam_rows(model, v, prompt, length):
      print(row, flush=True)


if __name__ == "__main__":
  main()
