r"""Trains a gru_jax model: flags and config in, `gru_jax.train.train_and_evaluate` does the rest.

  python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits \
      [--config.learning_rate=3e-3 ...]

Rerunning with the same --workdir resumes from its last checkpoint.  On a
cluster, jax.distributed is initialised from --coordinator_address /
--num_processes / --process_id, or detected automatically on SLURM and TPU VMs.
"""
import logging as pylogging
import os

from absl import app, flags, logging

from experiments import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")
cli.define_config("config", _DEFAULT_CONFIG, "Training config file.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): auto = in an srun step with several tasks or on a TPU pod.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from gru_jax import distributed, train  # after flag parsing: keeps --help fast
  # Orbax logs every save step at INFO; keep its warnings, drop the chatter.
  logging.get_absl_handler().addFilter(
      lambda r: "orbax" not in r.pathname or r.levelno >= pylogging.WARNING)
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  # Required here, not at import: tests import this module and parse other flags in-process.
  flags.mark_flag_as_required("workdir")
  cli.run(main)
