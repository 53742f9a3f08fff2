r"""IMDB sentiment with a bidirectional GRU on word tokens (TFDS `imdb_reviews`).

  python -m experiments.train --config=experiments/configs/imdb.py --workdir=runs/imdb

Needs TFDS data (internet on first use).  Literature: a single-layer (bi)GRU
from scratch reaches about 86-89% test accuracy.  Padded, masked batches.
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset = base.dataset_config("imdb_reviews", vocab_size=20000, max_len=400)
  c.model.hidden_sizes = (128,)
  c.model.bidirectional = True
  c.model.embed_dim = 128
  c.model.dropout = 0.5
  c.batch_size = 64
  c.num_epochs = 5
  c.optimizer.clip_norm = 1.0
  c.eval_splits = ("validation", "test")
  c.bucket_by_length = True
  c.trim_to_multiple = 50
  return c
