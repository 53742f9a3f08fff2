"""What the absl entrypoints share: flag parsing and errors as one line, not a traceback."""
import os
import sys

from absl import app, flags, logging


def _fail(message: str, code: int):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _unknown_key(e: Exception, argv) -> None:
  inner = e
  while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError(text))
    inner = inner.args[0]
  detail = str(inner)
  key = detail.splitlines()[0].strip("'\"")
  hint = " ".join(detail.splitlines()[1:])
  bad = [a for a in argv[1:] if a.startswith("--") and "." in a.split("=")[0]
         and a.split("=")[0].split(".")[-1] == key]
  _fail(f"unknown config key {key!r} in {' '.join(bad) or 'the --config overrides'}"
        f"{'; ' + hint if hint else ''} (the keys are in the config file and "
        "experiments/configs/base.py)", 2)


def define_config(name: str, default: str, help_text: str):
  """`config_flags.DEFINE_config_file` (locked), with a one-line error for a --config.KEY the
  config does not have.  ml_collections raises AttributeError/KeyError for one while the
  flag is defined (it reads the overrides from sys.argv) or, with --config given, while the
  flags are parsed (`parse_flags`)."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_key(e, sys.argv)


def parse_flags(argv):
  """absl's flag parsing, with its errors (and unknown config keys) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}\nPass --helpshort or --helpfull to see help on flags.", 1)
  except (AttributeError, KeyError) as e:
    _unknown_key(e, argv)
  except OSError as e:  # a --config file that cannot be read, met while applying overrides
    _fail(str(e), 1)


def run(main):
  """app.run(main) with parse_flags, and a ValueError, OSError or TrainingError from main
  (bad input, an unreadable config file) as one line; GRU_JAX_TRACEBACK=1 shows the
  traceback."""
  def wrapped(argv):
    try:
      main(argv)
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is the user's input
      # TrainingError only exists once gru_jax.train is imported; no need to import it here.
      train = sys.modules.get("gru_jax.train")
      mine = (ValueError, OSError) + ((train.TrainingError,) if train else ())
      if not isinstance(e, mine) or os.environ.get("GRU_JAX_TRACEBACK"):
        raise
      logging.error("%s", e)
      _fail(str(e), 1)
  app.run(wrapped, flags_parser=parse_flags)
