"""What the absl entrypoints share: flag parsing and errors as one line, not a traceback."""
import os
import sys

from absl import app, flags

# Flags this module defines for a caller (define_config) are the caller's: --help lists them.
flags.disclaim_key_flags()
_CONFIG_FLAGS = []


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
  _CONFIG_FLAGS.append(name)
  try:
    return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_key(e, sys.argv)


def _check_config_files(argv):
  """`error: config file X not found` rather than ml_collections' four lines, later."""
  for name in _CONFIG_FLAGS:
    for i, arg in enumerate(argv[1:], 1):
      if arg.startswith(f"--{name}="):
        path = arg.split("=", 1)[1]
      elif arg == f"--{name}" and i + 1 < len(argv):
        path = argv[i + 1]
      else:
        continue
      # ml_collections reads "file.py:args" as the file and an argument for its get_config.
      if path and not os.path.exists(path) and not os.path.exists(path.split(":")[0]):
        _fail(f"config file {path} not found", 1)


def parse_flags(argv):
  """absl's flag parsing, with its errors (and unknown config keys) as one line."""
  _check_config_files(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}\nPass --helpshort or --helpfull to see help on flags.", 1)
  except (AttributeError, KeyError) as e:
    _unknown_key(e, argv)
  except OSError as e:  # a --config file that cannot be read, met while applying overrides
    _fail(str(e), 1)


def run(main):
  """app.run(main) with parse_flags, and a ValueError, OSError, TrainingError or
  DataUnavailableError from main (bad input, an unreadable config file, a dataset that cannot
  be downloaded) printed once, as one `error:` line; Ctrl-C outside the training loop (which
  checkpoints first) exits 130 with one line.  GRU_JAX_TRACEBACK=1 shows the traceback."""
  def wrapped(argv):
    try:
      main(argv)
    except KeyboardInterrupt:
      if os.environ.get("GRU_JAX_TRACEBACK"):
        raise
      _fail("interrupted (SIGINT)", 130)
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is the user's input
      # TrainingError only exists once gru_jax.train is imported; no need to import it here.
      train = sys.modules.get("gru_jax.train")
      data = sys.modules.get("gru_jax.data.base")
      mine = ((ValueError, OSError) + ((train.TrainingError,) if train else ())
              + ((data.DataUnavailableError,) if data else ()))
      if not isinstance(e, mine) or os.environ.get("GRU_JAX_TRACEBACK"):
        raise
      _fail(str(e), 1)
  app.run(wrapped, flags_parser=parse_flags)
