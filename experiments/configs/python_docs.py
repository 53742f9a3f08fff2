r"""Character-level language model on Python's own documentation (embedded data), with sampling.

  python -m experiments.train --config=experiments/configs/python_docs.py --workdir=runs/docs
  python -m experiments.sample --workdir=runs/docs --prompt="The " --length=300

The text is CPython's pydoc topics (`gru_jax.data.local`; no download).  Reports
bits per character; `gru_jax.data.python_docs_baselines()` gives the n-gram
baselines on the same test characters.  Measured (Python 3.11.7, 2 CPU cores, about
4.5 min): test 1.645 / 1.642 / 1.631 bits per character for seeds 0 / 1 / 2
(validation 1.896 / 1.899 / 1.890); the best Witten-Bell n-gram (order 5) scores
1.752 (validation 2.057).  With ``--config.model.zoneout=0.1
--config.num_train_steps=3000`` (about 3x the time) the long run does not overfit:
test 1.548 / 1.545 / 1.550, validation 1.800 / 1.789 / 1.798 (README, "Experiments").
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset = base.dataset_config("python_docs", seq_len=100)
  c.model.hidden_sizes = (256, 256)
  c.model.batch_norm = False
  c.model.dropout = 0.2
  c.model.embed_dim = 64
  c.model.variant = "reset_after"
  c.batch_size = 64
  c.num_train_steps = 1000         # ~15 epochs; longer runs overfit this small text
  c.eval_every_steps = 250
  c.learning_rate = 2e-3
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.clip_norm = 1.0
  return c
