r"""Peak memory of one GRU training step with and without chunked rematerialisation.

  python -m experiments.memory --seq_lens=1000,3000,10000 --remat_chunk=100

Reads XLA's compiled memory analysis (temporary + argument + output bytes),
which is exact for the compiled program and needs no run, so T = 10,000
can be sized on any machine; --run also executes each step once to show it fits.
The two columns run different backends (printed): without remat the default
("xla" on CPU, its fused backward), with remat_chunk the "scan" backend, which
remat always uses, so the difference is remat's and the backend's together.
"""
import json

from absl import app, flags

flags.DEFINE_list("seq_lens", ["1000", "3000", "10000"], "Sequence lengths T.")
flags.DEFINE_integer("batch", 32, "B.", lower_bound=1)
flags.DEFINE_integer("input_size", 64, "D.", lower_bound=1)
flags.DEFINE_integer("hidden", 256, "H.", lower_bound=1)
flags.DEFINE_integer("remat_chunk", 100, "Chunk length for remat.", lower_bound=1)
flags.DEFINE_enum("variant", "seed", ["seed", "reset_after"], "GRU variant.")
flags.DEFINE_bool("run", False, "Also execute each compiled step once.")
flags.DEFINE_string("out", "", "Optional JSON output path.")
FLAGS = flags.FLAGS


def measure(t: int, chunk: int | None, run: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import gru_jax

  p = gru_jax.cell.init(jax.random.key(0), FLAGS.input_size, FLAGS.hidden)
  xs = jax.random.normal(jax.random.key(1), (FLAGS.batch, t, FLAGS.input_size))

  def loss(p, xs):
    return jnp.mean(gru_jax.gru(p, xs, variant=FLAGS.variant, remat_chunk=chunk)[1] ** 2)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = step.lower(p, xs).compile()
  mem = compiled.memory_analysis()
  peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  if run:
    jax.block_until_ready(compiled(p, xs))
  backend = gru_jax.scan.resolve_backend("auto", hidden_size=FLAGS.hidden, batch=FLAGS.batch,
                                         compute_dtype=xs.dtype, state_dtype=xs.dtype,
                                         remat_chunk=chunk, variant=FLAGS.variant)
  return {"T": t, "remat_chunk": chunk, "backend": backend,
          "temp_MiB": mem.temp_size_in_bytes / 2**20, "peak_MiB": peak / 2**20}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    seq_lens = [int(t) for t in FLAGS.seq_lens]
  except ValueError:
    raise ValueError(f"--seq_lens must be integers, got {FLAGS.seq_lens}") from None
  if not seq_lens or min(seq_lens) < 1:  # empty: min() raised "arg is an empty sequence"
    raise ValueError(f"--seq_lens must be one or more integers >= 1, got {seq_lens}")
  rows = []
  for t in seq_lens:
    for chunk in (None, FLAGS.remat_chunk):
      rows.append(measure(t, chunk, FLAGS.run))
  print(f"B={FLAGS.batch} D={FLAGS.input_size} H={FLAGS.hidden} variant={FLAGS.variant}")
  print(f"{'T':>7} {'remat':>7} {'backend':>8} {'temp MiB':>10} {'peak MiB':>10}")
  for r in rows:
    print(f"{r['T']:>7} {str(r['remat_chunk'] or '-'):>7} {r['backend']:>8} "
          f"{r['temp_MiB']:>10.1f} {r['peak_MiB']:>10.1f}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  from experiments import cli
  cli.run(main)
