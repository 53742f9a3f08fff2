r"""The default: the seed's model on scikit-learn's digits read as 8 rows of 8 pixels.

  python -m experiments.train --workdir=runs/digits
  (same as --config=experiments/configs/digits.py)

GRU(128) → BN → Dropout(0.5) → GRU(128) → BN → Dropout(0.5) → Dense(10), Adam,
batch 64, with batch-norm statistics re-estimated on training data before
each evaluation (see keras_faithful.py for the Keras recipe and why).
Measured: see the README's experiments table (filled from metrics.jsonl).
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset.name = "sequential_digits"
  c.dataset.pixels = "rows"
  c.num_epochs = 40
  c.learning_rate = 3e-3
  return c
