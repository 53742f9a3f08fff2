"""Times a `Seq2Seq` training step (gradient of the teacher-forced loss) and its forward
pass with each attention, at the `reversal` config's shapes by default.

    python experiments/attention_speed.py [B S L H [DTYPE]]

DTYPE ("float32" or "bfloat16") is the model's ``compute_dtype``.

Median of 10 calls after one that compiles.  Measured on the project's 2-core CPU VM
(2026-11-30, B=64, S=40, L=41, H=A=128): gradient none 27.2 ms, additive 73.1 ms,
multiplicative 57.2 ms; forward 10.9 / 22.3 / 16.6 ms.  The same timing of the
additive gradient before the decoder step was rematerialised (commit 6730e84): 121.4 ms.
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gru_jax import models


def median_ms(fn, *args, calls: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main(b: int = 64, s: int = 40, length: int = 41, h: int = 128, dtype: str = "float32",
         vocab: int = 23):
  rs = np.random.RandomState(0)
  src = jnp.asarray(rs.randint(3, vocab, (b, s)), jnp.int32)
  mask = jnp.ones((b, s), bool)
  dec, labels = (jnp.asarray(rs.randint(3, vocab, (b, length)), jnp.int32) for _ in range(2))
  for attention in models.ATTENTIONS:
    model = models.Seq2Seq(vocab, vocab, hidden_sizes=(h,), embed_dim=32, attention=attention,
                           compute_dtype=None if dtype == "float32" else jnp.dtype(dtype))
    params = model.init(jax.random.key(0), src, mask, decoder_inputs=dec)["params"]

    def loss(p, model=model):
      logits = model.apply({"params": p}, src, mask, decoder_inputs=dec)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grad = median_ms(jax.jit(jax.grad(loss)), params)
    fwd = median_ms(jax.jit(loss), params)
    print(f"{attention:>14}: gradient {grad:6.1f} ms, forward {fwd:6.1f} ms "
          f"(B={b} S={s} L={length} H={h}, {dtype})")


if __name__ == "__main__":
  args = sys.argv[1:]
  main(*map(int, args[:4]), *args[4:5])
