r"""The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015) at T=200.

  python -m experiments.train --config=experiments/configs/adding.py --workdir=runs/adding

Regression on the sum of the two marked values; predicting 1 everywhere
gives MSE ≈ 0.167.  One GRU(128), no batch norm or dropout (a
regression from one step's state needs neither).

Measured 2026-11-27 on the project's 2-core CPU machine: test MSE 0.0010 after
2,000 steps (validation 0.0010; it leaves the 0.16 plateau between steps 1,000 and
1,250), 107 s wall (fifth session's code; 138 s in the first session).
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset = base.dataset_config("adding", seq_len=200)
  c.model.hidden_sizes = (128,)
  c.model.batch_norm = False
  c.model.dropout = 0.0
  c.batch_size = 64
  c.num_epochs = 0
  c.num_train_steps = 2000
  c.eval_every_steps = 250
  c.learning_rate = 1e-3
  c.optimizer.clip_norm = 1.0
  c.eval_splits = ("validation", "test")
  return c
