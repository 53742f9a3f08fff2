r"""Sequence reversal: where attention is needed.

  python -m experiments.train --config=experiments/configs/reversal.py --workdir=runs/rev \
      [--config.model.attention=none]

Strings of 10-40 letters from a 20-letter alphabet, reversed (`gru_jax.data`'s
"reversal").  With attention (Bahdanau et al. 2015, the default here) each
target letter is read from its source position; Cho et al. (2014)'s
encoder–decoder (``--config.model.attention=none``) must hold the whole
string in one 128-unit state.  `sequence_accuracy` is greedy decoding's
exact-match rate.

Measured 2026-11-29 on the project's 2-core CPU machine, seeds 0 / 1 / 2, 3,000
steps: test sequence accuracy 0.995 / 0.986 / 0.992 with attention (6.4-7.8 min),
0.049 / 0.053 / 0.069 without (2.1-2.5 min); by source length (seed 0, `python -m
experiments.beam_eval --workdir=DIR --beam_sizes=1 --length_bins=10,20,30,41`):
0.997 / 0.996 / 0.992 for 10-19 / 20-29 / 30-40 letters with attention, 0.158 / 0 / 0
without; multiplicative attention (`--config.model.attention=multiplicative`, 2026-11-30):
0.982 / 0.970 / 0.978 (3.0 min).  The additive runs took 4.2 min after the decoder
step was rematerialised (seed 0 rerun, same metrics).  At learning rate 3e-3 the
additive run diverged.
"""
from experiments.configs import base


def get_config():
  c = base.get_base_config()
  c.dataset = base.dataset_config("reversal")
  c.model.hidden_sizes = (128,)
  c.model.batch_norm = False
  c.model.dropout = 0.0
  c.model.embed_dim = 32
  c.model.attention = "additive"
  c.batch_size = 64
  c.num_epochs = 0
  c.num_train_steps = 3000
  c.eval_every_steps = 1000
  c.learning_rate = 1e-3  # 3e-3 diverged with attention (README, "Experiments")
  c.optimizer.clip_norm = 1.0
  c.bn_recalibrate_batches = 0
  return c
