r"""Sequence accuracy of greedy decoding and beam search on a trained seq2seq run.

  python -m experiments.train --config=experiments/configs/number_words.py \
      --workdir=runs/words500 --config.num_train_steps=500
  python -m experiments.beam_eval --workdir=runs/words500 --beam_sizes=1,4

Decodes every example of --split with each beam size (1 is `greedy_decode`,
more is `beam_search`'s best beam) and prints the exact-match sequence accuracy
(every target token and <eos>, then padding), as the trainer's
``sequence_accuracy`` counts it (`gru_jax.train.decode_accuracy`); with
--length_bins, also per bin of source length (`gru_jax.train.accuracy_by_length`).
"""
from absl import flags

from experiments import cli

flags.DEFINE_string("workdir", None, "Training workdir of a 'seq2seq' run.")
flags.DEFINE_list("beam_sizes", ["1", "4"], "Beam sizes to compare (1: greedy).")
flags.DEFINE_string("split", "test", "Split to decode: train, validation or test.")
flags.DEFINE_float("length_penalty", 0.0, "beam_search's length_penalty.")
flags.DEFINE_integer("batch_size", 500, "Sources decoded per compiled call.")
flags.DEFINE_list("length_bins", [], "Also the accuracy per source-length bin, e.g. "
                  "10,20,30,41 for [10,20), [20,30), [30,41).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from gru_jax import train
  if FLAGS.length_bins:
    train.check_length_bins(FLAGS.length_bins)
  exact, lengths = train.decode_exact(FLAGS.workdir, FLAGS.beam_sizes, FLAGS.split,
                                      FLAGS.length_penalty, FLAGS.batch_size)
  for k, ok in exact.items():
    print(f"beam_size {k}: {FLAGS.split} sequence accuracy {ok.mean():.4f}")
    if FLAGS.length_bins:
      for (lo, hi), acc in train.accuracy_by_length(ok, lengths, FLAGS.length_bins).items():
        count = ((lengths >= lo) & (lengths < hi)).sum()
        print(f"  source length {lo}-{hi - 1}: {acc:.4f} ({count} examples)")


if __name__ == "__main__":
  # Required here, not at import: tests import this module and parse other flags in-process.
  flags.mark_flag_as_required("workdir")
  cli.run(main)
