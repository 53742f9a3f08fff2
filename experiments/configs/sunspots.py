r"""Yearly sunspot numbers (statsmodels), one-step-ahead forecast from a 20-year window.

  python -m experiments.train --config=experiments/configs/sunspots.py --workdir=runs/sunspots

The test split is the last years of the series, chronologically after
training; results are compared with persistence and ARIMA baselines on the
same years (README).
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset.name = "sunspots"
  c.dataset.window = 20
  c.model.hidden_sizes = (64,)
  c.model.batch_norm = False
  c.model.dropout = 0.0
  c.batch_size = 16
  c.num_epochs = 100
  c.learning_rate = 3e-3
  return c
