r"""Generates from a model trained by experiments.train: text from a character LM,
or a translation from a sequence-to-sequence model.

  python -m experiments.sample --workdir=runs/shakes --prompt="ROMEO:" --length=300
  python -m experiments.sample --workdir=runs/words --prompt=30015 [--beam_size=4]
  python -m experiments.sample --workdir=runs/words_attn --prompt=30015 --show_attention

Reads the run's config.json and latest checkpoint.  For an LM, --temperature
< 1 is more conservative, > 1 more varied, and --top_k / --top_p restrict each draw
to the k most probable characters / the nucleus of that mass, and --beam_size > 1 gives
the most probable continuation by beam search instead of a draw; a seq2seq model decodes
greedily, or with --beam_size > 1 by beam search (one source per call; --prompt is split
into characters, e.g. digits); --show_attention prints what a model trained with attention read
for each output word.
"""
from absl import flags

from experiments import cli

flags.DEFINE_string("workdir", None, "Training workdir of an 'lm' or 'seq2seq' run.")
flags.DEFINE_string("prompt", "\n", "Text to continue (lm) or to translate (seq2seq).")
flags.DEFINE_integer("length", 200, "Characters to generate (lm).")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature (lm).")
flags.DEFINE_integer("seed", 0, "Sampling seed (lm).")
flags.DEFINE_integer("top_k", None, "Draw only from the k most probable tokens (lm).")
flags.DEFINE_float("top_p", None, "Draw only from the nucleus of this probability mass (lm).")
flags.DEFINE_integer("beam_size", 1, "Beams: seq2seq decoding (1: greedy); lm: > 1 gives the "
                     "most probable continuation instead of a draw.")
flags.DEFINE_bool("show_attention", False, "Also print the attention weights of a seq2seq "
                  "model with attention: one row per output word, in percent per source "
                  "character.")
FLAGS = flags.FLAGS


def check_flags(workdir: str, prompt: str, length: int, temperature: float,
                beam_size: int = 1, top_k: int | None = None,
                top_p: float | None = None) -> None:
  """One-line errors for bad flags, before the (slow) restore of the checkpoint."""
  import math
  import os
  if not os.path.exists(workdir):
    raise ValueError(f"--workdir {workdir} does not exist")
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is not a directory")
  if not prompt:
    raise ValueError("--prompt must not be empty (the model continues or translates it)")
  if length < 0:
    raise ValueError(f"--length must be >= 0, got {length}")
  if not (temperature > 0 and math.isfinite(temperature)):
    raise ValueError(f"--temperature must be a finite number > 0, got {temperature}")
  if beam_size < 1:
    raise ValueError(f"--beam_size must be >= 1, got {beam_size}")
  if top_k is not None and top_k < 1:
    raise ValueError(f"--top_k must be >= 1, got {top_k}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"--top_p must be in (0, 1], got {top_p}")


def sample_text(workdir: str, prompt: str, length: int, temperature: float, seed: int,
                beam_size: int = 1, top_k: int | None = None,
                top_p: float | None = None, show_attention: bool = False) -> str:
  import jax
  import jax.numpy as jnp
  from absl import logging
  from gru_jax import models, train

  check_flags(workdir, prompt, length, temperature, beam_size, top_k, top_p)
  _, model, variables, info = train.restore_for_inference(workdir)
  vocab = info.extras.get("vocab")
  if model.task == "seq2seq":
    return translate(model, variables, info, prompt, beam_size, show_attention)
  if show_attention:
    raise ValueError("--show_attention is for a sequence-to-sequence model with attention")
  if model.task != "lm" or vocab is None:
    raise ValueError(f"{workdir} holds a {model.task!r} model on {info.name}, not a character "
                     "LM or a sequence-to-sequence model")
  index = {c: i for i, c in enumerate(vocab)}
  unknown = sorted({c for c in prompt if c not in index})
  if unknown:
    logging.warning("the prompt's characters %s are not in the model's vocabulary (%d "
                    "characters); the model reads each as the unknown character", unknown,
                    len(vocab))
  ids = jnp.array([index.get(c, info.extras.get("unk_id", 0)) for c in prompt], jnp.int32)
  if beam_size > 1 and length > 0:  # the most probable continuation: no draw
    out = models.beam_search_lm(model, variables, ids, length, beam_size=beam_size)[0][0]
  else:
    out = models.sample_lm(model, variables, ids, length, jax.random.key(seed),
                           temperature=temperature, top_k=top_k, top_p=top_p)
  return "".join(vocab[int(i)] for i in out)


def translate(model, variables, info, source: str, beam_size: int = 1,
              show_attention: bool = False) -> str:
  """Translation of one source string, read one character per token: greedy, or the
  best of ``beam_size`` beams; with ``show_attention``, followed by `alignment_table`."""
  import jax.numpy as jnp
  from gru_jax import models

  vocab, ex = info.extras["vocab"], info.extras
  if info.name == "number_words" and source.isascii() and source.isdigit():
    source = str(int(source))  # the data spells numbers without leading zeros
  index = {c: i for i, c in enumerate(vocab)}
  unknown = sorted({c for c in source if c not in index})
  if unknown or not 0 < len(source) <= info.seq_len:
    raise ValueError(f"the source must be 1-{info.seq_len} characters from the vocabulary; "
                     f"got {source!r}" + (f" (unknown: {unknown})" if unknown else ""))
  ids = jnp.full((1, info.seq_len), ex["pad_id"], jnp.int32)
  ids = ids.at[0, :len(source)].set(jnp.array([index[c] for c in source], jnp.int32))
  out = models.decode(model, variables, ids, ids != ex["pad_id"], beam_size=beam_size,
                      max_len=ex["target_len"], bos_id=ex["bos_id"], eos_id=ex["eos_id"],
                      pad_id=ex["pad_id"])[0]
  words = []
  for t in out.tolist():
    words.append(vocab[t])
    if t == ex["eos_id"]:
      break
  text = " ".join(w for w in words if w != vocab[ex["eos_id"]])
  if not show_attention:
    return text
  if model.attention == "none":
    raise ValueError("--show_attention needs a model trained with attention "
                     "(config.model.attention='additive'); this one has none")
  dec = jnp.concatenate([jnp.array([ex["bos_id"]], jnp.int32), out[:len(words) - 1]])
  alpha = models.attention_weights(model, variables, ids, ids != ex["pad_id"],
                                   decoder_inputs=dec[None])[0]
  return text + "\n" + alignment_table(words, list(source), alpha[:, :len(source)])


def alignment_table(targets: list[str], sources: list[str], alpha) -> str:
  """Attention weights [len(targets), len(sources)] as a table of percentages."""
  import numpy as np
  width = max(map(len, targets))
  cols = [max(3, len(s)) for s in sources]
  lines = [" " * width + "".join(f" {s:>{c}}" for s, c in zip(sources, cols))]
  for word, row in zip(targets, np.asarray(alpha)):
    lines.append(f"{word:<{width}}" + "".join(f" {round(100 * a):>{c}d}"
                                             for a, c in zip(row, cols)))
  return "\n".join(lines)


def main(argv):
  del argv
  opts = dict(beam_size=FLAGS.beam_size, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  check_flags(FLAGS.workdir, FLAGS.prompt, FLAGS.length, FLAGS.temperature, **opts)
  print(sample_text(FLAGS.workdir, FLAGS.prompt, FLAGS.length, FLAGS.temperature, FLAGS.seed,
                    show_attention=FLAGS.show_attention, **opts))


if __name__ == "__main__":
  # Required here, not at import: tests import this module and parse other flags in-process.
  flags.mark_flag_as_required("workdir")
  cli.run(main)
