r"""Samples text from a character language model trained by experiments.train.

  python -m experiments.sample --workdir=runs/shakes --prompt="ROMEO:" --length=300

Reads the run's config.json and latest checkpoint; --temperature < 1 is more
conservative, > 1 more varied.
"""
from absl import app, flags

flags.DEFINE_string("workdir", None, "Training workdir of an 'lm' run.", required=True)
flags.DEFINE_string("prompt", "\n", "Text to continue.")
flags.DEFINE_integer("length", 200, "Characters to generate.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def sample_text(workdir: str, prompt: str, length: int, temperature: float, seed: int) -> str:
  import jax
  import jax.numpy as jnp
  from gru_jax import models, train

  _, model, variables, info = train.restore_for_inference(workdir)
  vocab = info.extras.get("vocab")
  if model.task != "lm" or vocab is None:
    raise ValueError(f"{workdir} holds a {model.task!r} model on {info.name}, not a character LM")
  index = {c: i for i, c in enumerate(vocab)}
  ids = jnp.array([index.get(c, info.extras.get("unk_id", 0)) for c in prompt], jnp.int32)
  out = models.sample_lm(model, variables, ids, length, jax.random.key(seed),
                         temperature=temperature)
  return "".join(vocab[int(i)] for i in out)


def main(argv):
  del argv
  print(sample_text(FLAGS.workdir, FLAGS.prompt, FLAGS.length, FLAGS.temperature, FLAGS.seed))


if __name__ == "__main__":
  app.run(main)
