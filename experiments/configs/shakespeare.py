r"""Character-level language model on TFDS `tiny_shakespeare`, with sampling.

  python -m experiments.train --config=experiments/configs/shakespeare.py --workdir=runs/shakes

Needs TFDS data (internet on first use).  Reports bits per character.
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset = base.dataset_config("tiny_shakespeare", seq_len=100)
  c.model.hidden_sizes = (256, 256)
  c.model.batch_norm = False
  c.model.dropout = 0.2
  c.model.embed_dim = 64
  c.batch_size = 64
  c.num_epochs = 20
  c.optimizer.clip_norm = 1.0
  return c
