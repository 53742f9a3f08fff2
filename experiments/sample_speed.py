"""Times `models.sample_lm` against the earlier O(T^2) sampler on a 2x256 character LM.

    python experiments/sample_speed.py

The earlier sampler (copied below) reran the model over a fixed-size masked
buffer at every step; `sample_lm` runs the prompt once and then one GRU step
per token from the carried states.  Prints each one's time (first call
includes compilation; then the median of 3) and the fraction of tokens on
which the two agree for the same key.  Measured on the project's 2-core CPU
VM (2026-11-29): 200 tokens 1.532 s -> 0.015 s, 500 tokens 9.248 s -> 0.043 s,
all tokens equal.
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
      t0 = time.perf_counter()
      run(jax.random.key(1)).block_until_ready()
      first = time.perf_counter() - t0
      times = []
      for i in range(3):
        t0 = time.perf_counter()
        run(jax.random.key(2 + i)).block_until_ready()
        times.append(time.perf_counter() - t0)
      print(f"length {length} {name}: first call {first:.2f} s, then median "
            f"{sorted(times)[1]:.3f} s", flush=True)
    a, b = (run(jax.random.key(9)) for run in runs.values())
    print(f"length {length}: fraction of equal tokens for the same key: "
          f"{float((a == b).mean()):.3f}")


if __name__ == "__main__":
  main()
