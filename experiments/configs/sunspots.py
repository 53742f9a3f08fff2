r"""Yearly sunspot numbers (statsmodels), one-step-ahead forecast from a 20-year window.

  python -m experiments.train --config=experiments/configs/sunspots.py --workdir=runs/sunspots

The test split is the last years of the series, chronologically after
training; results are compared with persistence and ARIMA baselines on the
same years (README).  Chosen by validation RMSE with
  python launch/sweep.py --sweep_dir runs/sweep_sun --config experiments/configs/sunspots.py \
      --grid learning_rate=1e-3,3e-3 --grid num_epochs=30,100 --grid model.input_dropout=0.0,0.2 \
      --set model.hidden_sizes="(32,)" --metric validation/rmse --parallel 2
(8 trials, 84 s on the 2-core machine; best: lr 3e-3, 30 epochs, no input dropout,
validation RMSE 17.95 sunspots; its test RMSE 16.12 against ARIMA(9,0,0) 16.87,
linear 18.60 and persistence 29.31 on 1963-2008).  Seeds 0/1/2 with this
config: test RMSE 16.12 / 15.28 / 16.44, 10-16 s wall each.
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset = base.dataset_config("sunspots", window=20)
  c.model.hidden_sizes = (32,)
  c.model.batch_norm = False
  c.model.dropout = 0.0
  c.batch_size = 16
  c.num_epochs = 30
  c.learning_rate = 3e-3
  return c
