r"""Sequential pixel MNIST (784 steps); --config.dataset.permuted=True for permuted MNIST.

  python -m experiments.train --config=experiments/configs/mnist.py --workdir=runs/smnist

Needs the TFDS `mnist` data (internet on first use).  Literature: LSTM
98.9% / BN-LSTM 99.0% sequential, 90.2% / 95.4% permuted (Cooijmans et al. 2016).
Not run on this project's 2-core machine (no network, and hours of CPU).
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset = base.dataset_config("mnist", permuted=False)
  c.model.hidden_sizes = (128,)
  c.model.dropout = 0.1
  c.batch_size = 128
  c.num_epochs = 50
  c.optimizer.clip_norm = 1.0
  c.remat = 112
  return c
