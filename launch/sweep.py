#!/usr/bin/env python3
"""Hyperparameter sweeps for experiments.train: grid, random search and successive halving.

Each trial is one run of `python -m experiments.train` with its own
`--config.KEY=VALUE` overrides and its own workdir (<sweep_dir>/trial_NNN).
Trials run on this machine N at a time (--parallel), or are printed as commands
for a cluster (--emit shell|slurm|tpu). The sweep ends with a table of all
trials sorted by --metric, also written to <sweep_dir>/results.json and
results.csv. Failed trials are marked in the table; the sweep goes on.

Successive halving (--halving) spends the step budget on promising trials: all
trials train for a few steps, the best 1/eta continue (resumed from their
checkpoints, in the same workdirs) for eta times as many, and so on up to
--max_steps. --asha promotes asynchronously (as soon as a trial ranks in the
top 1/eta of those finished so far), so no worker waits for a rung to finish.

The sweep's state lives in --sweep_dir: rerunning the same command (or just
`--sweep_dir DIR`) resumes it, skipping finished trials.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime
import fcntl
import itertools
import json
import math
import os
import random
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time

EXAMPLES = """\
examples:
  # a 2x2 grid, two trials at a time
  python launch/sweep.py --sweep_dir runs/grid1 \\
      --grid learning_rate=1e-3,3e-3 --grid 'model.hidden_sizes=(64,),(128,)' --parallel 2

  # 16 random trials; successive halving 16 x 100 steps -> 5 x 300 -> 1 x 900
  python launch/sweep.py --sweep_dir runs/rand1 \\
      --random learning_rate=loguniform:1e-4:1e-2 --random model.dropout=uniform:0:0.5 \\
      --num_trials 16 --seed 0 --halving --min_steps 100 --max_steps 900 \\
      --metric validation/accuracy --parallel 4 --gpus_per_trial 1

  # on SLURM: submit a rung, wait for it, rerun the same line for the next one
  python launch/sweep.py --sweep_dir runs/rand1 ... --emit slurm \\
      --sbatch_flags="--gpus-per-node=1 --ntasks-per-node=1" | bash

  # print the commands only; show the table of a sweep
  python launch/sweep.py --sweep_dir runs/grid1 --grid seed=0,1,2 --dry-run
  python launch/sweep.py --sweep_dir runs/grid1 --report --metric validation/loss

distributions for --random KEY=DIST:
  uniform:LOW:HIGH      a float, uniform
  loguniform:LOW:HIGH   a float whose logarithm is uniform (LOW > 0): learning rates
  int:LOW:HIGH          an integer from LOW to HIGH inclusive, uniform
  logint:LOW:HIGH       an integer whose logarithm is about uniform (LOW >= 1): widths
  choice:A,B,C          one of the values
Random floats are rounded to 4 significant digits so tables and commands stay readable.
With both --grid and --random, every grid point is run with each of the
--num_trials random draws (so --grid seed=0,1,2 repeats every draw 3 times).

spec files (--spec): JSON, or Python defining get_sweep(), holding a dict such as
  {"grid": {"model.hidden_sizes": [[64], [128]]},
   "random": {"learning_rate": "loguniform:1e-4:1e-2", "model.variant": ["seed", "reset_after"]},
   "fixed": {"num_epochs": 5}, "num_trials": 8, "seed": 0,
   "metric": "validation/accuracy", "mode": "max",
   "halving": {"eta": 3, "min_steps": 100, "max_steps": 900, "asynchronous": false}}
or {"trials": [{...overrides...}, ...]} for a hand-made list. Flags add to the file.
"""

DEFAULT_CONFIG = "experiments/configs/digits.py"
DEFAULT_METRIC = "validation/loss"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository: the default --config is found from here
MARKER = ".sweep_trial.json"  # in each local trial workdir: which sweep and trial started it
SPEC_KEYS = ("config", "grid", "random", "fixed", "trials", "num_trials", "seed", "metric",
             "mode", "halving")
HALVING_KEYS = ("eta", "min_steps", "max_steps", "asynchronous")
_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class SpecError(ValueError):
  """A sweep specification that cannot be run; the message names the bad argument."""


# ----------------------------------------------------------------------------- values

def parse_value(text: str):
  """'1e-3' -> 0.001, '64' -> 64, 'True' -> True; anything else stays a string."""
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text.strip()
  if value is None or isinstance(value, (bool, int, float, str, list, tuple)):
    return list(value) if isinstance(value, tuple) else value
  return text.strip()


def format_value(value) -> str:
  """How a value is written on the trainer's command line (--config.KEY=...)."""
  if isinstance(value, str):
    return value
  if isinstance(value, float):
    return repr(value)  # the shortest form that reads back exactly: 0.001, 3e-05
  if isinstance(value, list):
    return repr(tuple(value))
  return str(value)


def _check_key(key: str, where: str) -> str:
  if not _KEY_RE.match(key):
    raise SpecError(f"{where}: {key!r} is not a config key such as learning_rate or "
                    "model.dropout")
  return key


def _split_assignment(text: str, where: str, form: str) -> tuple[str, str]:
  key, sep, rest = text.partition("=")
  if not sep or not key.strip() or not rest.strip():
    raise SpecError(f"{where} {text!r}: expected {form}")
  return _check_key(key.strip(), f"{where} {text!r}"), rest.strip()


def split_values(text: str) -> list[str]:
  """'1e-3,3e-3' -> ['1e-3', '3e-3']; commas inside brackets or quotes stay:
  '(8,),(16,)' -> two tuples, '"a,b","c"' -> two strings."""
  values, depth, start, quote = [], 0, 0, None
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
      continue
    if ch in "'\"":
      quote = ch
      continue
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      values.append(text[start:i].strip())
      start = i + 1
  values.append(text[start:].strip())
  return values


def parse_grid(text: str) -> tuple[str, list]:
  key, rest = _split_assignment(text, "--grid", "KEY=V1,V2,... e.g. learning_rate=1e-3,3e-3")
  values = split_values(rest)
  if any(not v for v in values):
    raise SpecError(f"--grid {text!r}: empty value in the list")
  return key, [parse_value(v) for v in values]


def parse_set(text: str) -> tuple[str, object]:
  key, rest = _split_assignment(text, "--set", "KEY=VALUE e.g. num_epochs=5")
  return key, parse_value(rest)


# ----------------------------------------------------------------------------- distributions

@dataclasses.dataclass(frozen=True)
class Dist:
  """A distribution for random search, written kind:LOW:HIGH or choice:A,B,C."""
  kind: str
  low: float = 0.0
  high: float = 0.0
  choices: tuple = ()

  def sample(self, rng: random.Random):
    if self.kind == "choice":
      return self.choices[rng.randrange(len(self.choices))]
    if self.kind == "int":
      return rng.randint(int(self.low), int(self.high))
    if self.kind == "logint":
      # floor of a log-uniform draw on [low, high + 1): P(k) is proportional to log((k+1)/k).
      x = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
      return min(int(x), int(self.high))
    if self.kind == "loguniform":
      x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    else:
      x = rng.uniform(self.low, self.high)
    return min(max(float(f"{x:.4g}"), self.low), self.high)

  def __str__(self):
    if self.kind == "choice":
      return "choice:" + ",".join(format_value(c) for c in self.choices)
    fmt = (lambda v: str(int(v))) if self.kind in ("int", "logint") else format_value
    return f"{self.kind}:{fmt(self.low)}:{fmt(self.high)}"


DIST_KINDS = ("uniform", "loguniform", "int", "logint", "choice")


def parse_dist(spec, where: str) -> Dist:
  """'loguniform:1e-4:1e-2' -> Dist; a list (from a spec file) is a choice."""
  if isinstance(spec, (list, tuple)):
    if not spec:
      raise SpecError(f"{where}: the list of choices is empty")
    return Dist("choice", choices=tuple(spec))
  if not isinstance(spec, str):
    raise SpecError(f"{where}: expected a string such as 'loguniform:1e-4:1e-2' or a list of "
                    f"choices, got {spec!r}")
  kind, sep, rest = spec.partition(":")
  if kind not in DIST_KINDS or not sep:
    raise SpecError(f"{where}: unknown distribution {spec!r}; use one of "
                    "uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH, logint:LOW:HIGH, "
                    "choice:A,B,C")
  if kind == "choice":
    values = split_values(rest)
    if any(not v for v in values):
      raise SpecError(f"{where}: {spec!r} has an empty choice")
    return Dist("choice", choices=tuple(parse_value(v) for v in values))
  parts = rest.split(":")
  if len(parts) != 2:
    raise SpecError(f"{where}: {spec!r} needs exactly two bounds, {kind}:LOW:HIGH")
  try:
    low, high = (float(p) for p in parts)
  except ValueError:
    raise SpecError(f"{where}: the bounds of {spec!r} must be numbers") from None
  if not (math.isfinite(low) and math.isfinite(high)):
    raise SpecError(f"{where}: the bounds of {spec!r} must be finite")
  if low > high:
    raise SpecError(f"{where}: {spec!r} has LOW > HIGH")
  if kind in ("int", "logint") and (low != int(low) or high != int(high)):
    raise SpecError(f"{where}: the bounds of {spec!r} must be integers")
  if kind == "loguniform" and low <= 0:
    raise SpecError(f"{where}: {spec!r} needs LOW > 0 (it is log-uniform)")
  if kind == "logint" and low < 1:
    raise SpecError(f"{where}: {spec!r} needs LOW >= 1 (it is log-uniform)")
  return Dist(kind, low, high)


def parse_random(text: str) -> tuple[str, Dist]:
  key, rest = _split_assignment(text, "--random", "KEY=DIST e.g. learning_rate=loguniform:1e-4:1e-2")
  return key, parse_dist(rest, f"--random {text!r}")


# ----------------------------------------------------------------------------- trials

def make_trials(grid: dict, randoms: dict, num_trials: int | None, seed: int) -> list[dict]:
  """Every grid point crossed with num_trials random draws; deterministic in seed."""
  keys = list(grid)
  points = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
  if not randoms:
    return points
  rng = random.Random(seed)
  draws = [{k: d.sample(rng) for k, d in randoms.items()} for _ in range(num_trials)]
  return [{**point, **draw} for draw in draws for point in points]


def halving_budgets(min_steps: int, max_steps: int, eta: int) -> list[int]:
  """Step budgets max_steps / eta^k down to no less than min_steps: 100, 300, 900, 2700."""
  rungs = 0
  while min_steps * eta ** (rungs + 1) <= max_steps:
    rungs += 1
  return [max(1, round(max_steps / eta ** (rungs - i))) for i in range(rungs + 1)]


def survivors(n: int, rungs: int, eta: int) -> list[int]:
  """How many trials enter each rung under synchronous successive halving."""
  counts = [n]
  for _ in range(rungs - 1):
    counts.append(max(1, counts[-1] // eta))
  return counts


def _top(scores: dict, candidates, keep: int) -> list[int]:
  """The `keep` best candidates by score (lower is better); unscored ones never rank."""
  ranked = sorted((t for t in candidates if scores.get(t) is not None),
                  key=lambda t: (scores[t], t))
  return ranked[:keep]


def next_jobs(n: int, scores: list[dict], failed: set, busy: set, eta: int,
              asynchronous: bool = False) -> list[tuple[int, int]]:
  """The (trial, rung) jobs that can start now, highest rung first.

  scores[k] maps each trial that finished rung k to its score (lower is better,
  None when the metric is missing); with one rung this is a plain sweep.
  Synchronous: rung k+1 starts when every trial of rung k has finished, with
  the best max(1, n_k // eta) of them. Asynchronous (ASHA): a trial is promoted
  as soon as it is in the top 1/eta of the trials that finished its rung so far;
  when nothing else can run, the synchronous rule finishes the top rungs.
  """
  rungs = len(scores)
  if asynchronous:
    jobs = []
    for k in reversed(range(rungs - 1)):
      for t in _top(scores[k], scores[k], len(scores[k]) // eta):
        if t not in scores[k + 1] and t not in failed and t not in busy:
          jobs.append((t, k + 1))
    jobs += [(t, 0) for t in range(n) if t not in scores[0] and t not in failed and t not in busy]
    if jobs or busy:
      return jobs
  entered = list(range(n))
  for k in range(rungs):
    todo = [t for t in entered if t not in scores[k] and t not in failed]
    if todo:
      return [(t, k) for t in todo if t not in busy]
    if k + 1 < rungs:
      entered = _top(scores[k], entered, max(1, len(entered) // eta))
  return []


# ----------------------------------------------------------------------------- spec

def infer_mode(metric: str) -> str:
  name = metric.rsplit("/", 1)[-1].lower()
  if any(w in name for w in ("acc", "f1", "auc", "precision", "recall", "r2", "score")):
    return "max"
  if any(w in name for w in ("loss", "err", "rmse", "mae", "mse", "perplexity", "nll")):
    return "min"
  raise SpecError(f"--mode: cannot tell whether a higher or a lower {metric} is better; "
                  "pass --mode max or --mode min")


def check_metric(metric) -> str:
  if not isinstance(metric, str):
    raise SpecError(f"--metric must be a string SPLIT/NAME such as validation/accuracy, "
                    f"got {metric!r}")
  split, sep, name = metric.partition("/")
  if not sep or not split or not name:
    raise SpecError(f"--metric {metric!r}: expected SPLIT/NAME such as validation/accuracy")
  return metric


def _plain(value):
  """NumPy scalars and arrays from a Python spec as plain Python values (np.int64(16) -> 16):
  sweep.json and the trainer's flags need those."""
  if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_plain(v) for v in value)
  return value


def load_spec_file(path: str) -> dict:
  if not os.path.exists(path):
    raise SpecError(f"--spec {path!r}: no such file")
  try:
    if path.endswith(".py"):
      namespace = runpy.run_path(path)
      if "get_sweep" not in namespace:
        raise SpecError(f"--spec {path!r}: a Python spec must define get_sweep() returning a dict")
      spec = _plain(namespace["get_sweep"]())
    else:
      with open(path) as f:
        spec = json.load(f)
  except json.JSONDecodeError as e:
    raise SpecError(f"--spec {path!r}: not valid JSON ({e})") from None
  if not isinstance(spec, dict):
    raise SpecError(f"--spec {path!r}: expected a dict, got {type(spec).__name__}")
  unknown = sorted(set(spec) - set(SPEC_KEYS))
  if unknown:
    raise SpecError(f"--spec {path!r}: unknown key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
  return spec


def _spec_dict(spec: dict, key: str, path: str) -> dict:
  value = spec.get(key) or {}
  if not isinstance(value, dict):
    raise SpecError(f"--spec {path!r}: {key!r} must be a dict of config key -> value")
  return value


def _positive_int(value, where: str, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise SpecError(f"{where} must be an integer >= {minimum}, got {value!r}")
  return value


def _flag_key(arg: str) -> str | None:
  """'--config.model.dropout=0.1' -> 'model.dropout'; None for any other trainer flag."""
  if not arg.startswith("--config."):
    return None
  return arg[len("--config."):].partition("=")[0]


def build_sweep(args, extra_args: list[str]) -> dict:
  """The sweep's definition (what sweep.json stores) from flags and --spec."""
  path = args.spec or ""
  spec = load_spec_file(path) if args.spec else {}
  swept: dict[str, str] = {}  # key -> where it was given, to refuse a key swept twice

  def claim(key, where):
    _check_key(key, where)
    if key in swept:
      raise SpecError(f"{where}: {key!r} is already given by {swept[key]}")
    swept[key] = where

  def gather(section, flag, from_spec, from_flag):
    """One section of the spec file plus its repeated flag, e.g. "grid" and --grid."""
    out = {}
    for key, value in _spec_dict(spec, section, path).items():
      claim(key, f"--spec {path!r} {section}")
      out[key] = from_spec(key, value)
    for text in getattr(args, flag) or ():
      key, value = from_flag(text)
      claim(key, f"--{flag} {text!r}")
      out[key] = value
    return out

  def grid_values(key, values):
    if not isinstance(values, list) or not values:
      raise SpecError(f"--spec {path!r}: grid[{key!r}] must be a non-empty list")
    return values

  grid = gather("grid", "grid", grid_values, parse_grid)
  randoms = gather("random", "random",
                   lambda key, d: parse_dist(d, f"--spec {path!r} random[{key!r}]"), parse_random)
  fixed = gather("fixed", "set", lambda key, value: value, parse_set)

  num_trials = args.num_trials if args.num_trials is not None else spec.get("num_trials")
  seed = args.seed if args.seed is not None else spec.get("seed", 0)
  _positive_int(seed, "--seed", minimum=0)
  explicit = spec.get("trials")
  if explicit is not None:
    if grid or randoms:
      raise SpecError(f"--spec {path!r}: 'trials' lists the trials itself; drop grid/random")
    if not isinstance(explicit, list) or not explicit or not all(isinstance(t, dict) for t in explicit):
      raise SpecError(f"--spec {path!r}: 'trials' must be a non-empty list of dicts")
    for t in explicit:
      for key in t:
        _check_key(key, f"--spec {path!r} trials")
        if key in fixed:
          raise SpecError(f"--spec {path!r} trials: {key!r} is also fixed")
    overrides = [dict(t) for t in explicit]
  else:
    if randoms:
      if num_trials is None:
        raise SpecError("--num_trials is required with --random (how many draws?)")
      _positive_int(num_trials, "--num_trials")
    elif num_trials is not None:
      raise SpecError("--num_trials only applies to --random; a grid runs every point once")
    if not grid and not randoms:
      raise SpecError("nothing to sweep: give --grid, --random or --spec")
    overrides = make_trials(grid, randoms, num_trials, seed)
  # absl keeps the last of repeated flags, so a trainer flag would beat the value of every trial.
  given = dict(swept)
  for o in overrides:
    for key in o:
      given.setdefault(key, f"--spec {path!r} trials")
  for arg in extra_args:
    key = _flag_key(arg)
    if key in given:
      raise SpecError(f"trainer flag {arg!r} would override {key!r} (given by {given[key]}) in "
                      "every trial; drop one of them")

  halving = None
  hspec = spec.get("halving")
  if hspec is not None and not isinstance(hspec, dict):
    raise SpecError(f"--spec {path!r}: 'halving' must be a dict with keys {list(HALVING_KEYS)}")
  hspec = dict(hspec or {})
  unknown = sorted(set(hspec) - set(HALVING_KEYS))
  if unknown:
    raise SpecError(f"--spec {path!r}: unknown halving key(s) {unknown}; allowed: "
                    f"{list(HALVING_KEYS)}")
  for name in ("eta", "min_steps", "max_steps"):
    if getattr(args, name) is not None:
      hspec[name] = getattr(args, name)
  if args.asha:
    hspec["asynchronous"] = True
  if args.halving or args.asha or spec.get("halving") is not None:
    eta = _positive_int(hspec.get("eta", 3), "--eta", minimum=2)
    if hspec.get("min_steps") is None or hspec.get("max_steps") is None:
      raise SpecError("--halving needs --min_steps and --max_steps (the step budgets of the "
                      "first and last rungs)")
    lo = _positive_int(hspec["min_steps"], "--min_steps")
    hi = _positive_int(hspec["max_steps"], "--max_steps")
    if hi < lo * eta:
      raise SpecError(f"--max_steps ({hi}) must be at least --min_steps * --eta ({lo * eta}) "
                      "for a second rung")
    clash = ("num_train_steps" in swept or any("num_train_steps" in o for o in overrides)
             or any(_flag_key(a) == "num_train_steps" for a in extra_args))
    if clash:
      raise SpecError("successive halving sets num_train_steps itself; do not sweep or fix it")
    halving = {"eta": eta, "min_steps": lo, "max_steps": hi,
               "asynchronous": bool(hspec.get("asynchronous", False)),
               "budgets": halving_budgets(lo, hi, eta)}
  elif hspec:
    raise SpecError("--eta/--min_steps/--max_steps need --halving (or --asha)")

  metric = check_metric(args.metric or spec.get("metric") or DEFAULT_METRIC)
  mode = args.mode or spec.get("mode") or infer_mode(metric)
  if mode not in ("min", "max"):
    raise SpecError(f"--mode must be 'min' or 'max', got {mode!r}")
  width = max(3, len(str(len(overrides) - 1)))
  definition = {
      "config": args.config or spec.get("config") or default_config(args.emit),
      "workdir_root": args.workdir_root or args.sweep_dir,
      "trials": [{"name": f"trial_{i:0{width}d}", "overrides": o} for i, o in enumerate(overrides)],
      "fixed": fixed,
      "extra_args": list(extra_args),
      "halving": halving,
      "metric": metric,
      "mode": mode,
      "spec": {"grid": grid, "random": {k: str(d) for k, d in randoms.items()},
               "num_trials": num_trials, "seed": seed},
  }
  try:  # sweep.json must take it: fail here, before anything is written
    json.dumps(definition)
  except (TypeError, ValueError) as e:
    raise SpecError(f"--spec {path!r}: {e}; use plain values (numbers, strings, lists)") from None
  return definition


def default_config(emit: str | None) -> str:
  """DEFAULT_CONFIG as written from the repository root (where the trainer runs, and the
  workers of --emit tpu resolve it from their REMOTE_DIR), else as an absolute path."""
  here = os.path.realpath(os.path.abspath(DEFAULT_CONFIG))
  if emit == "tpu" or here == os.path.realpath(os.path.join(ROOT, DEFAULT_CONFIG)):
    return DEFAULT_CONFIG
  return os.path.join(ROOT, DEFAULT_CONFIG)


def check_config(config: str, emit: str | None):
  """Refuses a missing config file now rather than in every trial."""
  # --emit tpu's path is relative to REMOTE_DIR on the workers: nothing to check here.
  if emit == "tpu" or "://" in config:
    return
  # ml_collections also takes FILE:ARGS (an argument for get_config).
  if not (os.path.isfile(config) or os.path.isfile(config.partition(":")[0])):
    raise SpecError(f"--config {config!r}: no such file (relative to {os.getcwd()})")


IDENTITY_KEYS = ("config", "workdir_root", "trials", "fixed", "extra_args", "halving")


# ----------------------------------------------------------------------------- metrics

def _open(path: str):
  if "://" in path:  # gs:// workdirs on TPU; tensorflow is a dependency of the project
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.GFile(path)
  return open(path)


def read_metrics(workdir: str) -> list[dict]:
  """The records of <workdir>/metrics.jsonl; a torn last line is skipped."""
  path = workdir.rstrip("/") + "/metrics.jsonl"
  try:
    with _open(path) as f:
      lines = f.read().splitlines()
  except (OSError, IOError):
    return []
  except Exception as e:  # pylint: disable=broad-except  # tf.errors.NotFoundError and friends
    if type(e).__name__ == "NotFoundError":
      return []
    raise
  records = []
  for line in lines:
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
      records.append(rec)
  return records


def final_metrics(records: list[dict], max_step: int | None = None) -> dict:
  """{'split/name': value} from the last record of each split holding that name."""
  out = {}
  for rec in records:
    if max_step is not None and rec["step"] > max_step:
      continue
    split = rec.get("split", "train")
    for name, value in rec.items():
      if name not in ("step", "split") and isinstance(value, (int, float)) \
          and not isinstance(value, bool):
        out[f"{split}/{name}"] = value
  return out


def last_step(records: list[dict]) -> int | None:
  return max((int(r["step"]) for r in records), default=None)


# ----------------------------------------------------------------------------- the sweep

class Sweep:
  """A sweep's definition plus where its trials keep their state on disk."""

  def __init__(self, definition: dict, sweep_dir: str, trainer: list[str] | None = None):
    self.d = definition
    self.dir = sweep_dir
    self.trainer = trainer
    self.names = [t["name"] for t in definition["trials"]]
    self.budgets = (definition["halving"] or {}).get("budgets") or [None]
    self.eta = (definition["halving"] or {}).get("eta", 3)
    self.asynchronous = bool((definition["halving"] or {}).get("asynchronous"))
    self.jobs_path = os.path.join(sweep_dir, "jobs.json")
    self.jobs = {}  # trial name -> {"rung", "budget"} of its last started or emitted job
    if os.path.exists(self.jobs_path):
      with open(self.jobs_path) as f:
        self.jobs = json.load(f)

  def workdir(self, t: int) -> str:
    return os.path.join(self.d["workdir_root"], self.names[t])

  def log_path(self, t: int) -> str:
    return os.path.join(self.dir, "logs", self.names[t] + ".log")

  def rc_path(self, t: int) -> str:
    return os.path.join(self.dir, "logs", self.names[t] + ".returncode")

  def returncode(self, t: int) -> int | None:
    try:
      with open(self.rc_path(t)) as f:
        return int(f.read().strip())
    except (OSError, ValueError):
      return None

  def score(self, value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
      return None
    return value if self.d["mode"] == "min" else -value

  def scan(self) -> tuple[list[dict], set, dict]:
    """Per-rung scores, failed trials and each trial's records, read from disk."""
    scores = [dict() for _ in self.budgets]
    failed = set()
    records = {}
    for t in range(len(self.names)):
      recs = records[t] = read_metrics(self.workdir(t))
      rc = self.returncode(t)
      steps = last_step(recs)
      job = self.jobs.get(self.names[t])
      for k, budget in enumerate(self.budgets):
        # Rungs from the current job's on count only once its process has exited cleanly:
        # the trainer logs the last step's metrics before its final checkpoint is written.
        exited = rc == 0 or (job is not None and k < job["rung"]) or \
            (job is None and budget is not None)
        if exited and (budget is None or (steps is not None and steps >= budget)):
          scores[k][t] = self.score(final_metrics(recs, budget).get(self.d["metric"]))
      short = (rc == 0 and job is not None and job.get("budget") is not None
               and (steps or 0) < job["budget"])
      if (rc is not None and rc != 0) or short:
        failed.add(t)
    return scores, failed, records

  def waiting(self, scores, failed) -> set:
    """Emitted jobs that have neither finished nor failed (still queued or running)."""
    out = set()
    for t, name in enumerate(self.names):
      job = self.jobs.get(name)
      if job and t not in failed and t not in scores[job["rung"]] and self.returncode(t) is None:
        out.add(t)
    return out

  def plan(self, scores, failed, busy) -> list[tuple[int, int]]:
    return next_jobs(len(self.names), scores, failed, busy, self.eta, self.asynchronous)

  def start_job(self, t: int, rung: int):
    """Records that trial t is (about to be) running rung `rung`; clears its old status."""
    os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
    if os.path.exists(self.rc_path(t)):
      os.remove(self.rc_path(t))
    self.jobs[self.names[t]] = {"rung": rung, "budget": self.budgets[rung]}
    _write_json(self.jobs_path, self.jobs)
    workdir = self.workdir(t)
    if "://" not in workdir:  # remote workdirs (gs://) are neither created nor marked here
      os.makedirs(workdir, exist_ok=True)
      if not os.path.exists(os.path.join(workdir, MARKER)):
        _write_json(os.path.join(workdir, MARKER), self.marker(t))

  def marker(self, t: int) -> dict:
    """What MARKER holds: the sweep (its directory) and the trial that own the workdir."""
    return {"sweep_dir": os.path.realpath(self.dir), "trial": self.names[t],
            "overrides": self.d["trials"][t]["overrides"]}

  def check_workdirs(self):
    """Refuses a trial workdir started by another sweep (two sweeps given the same
    --workdir_root): the trainer would resume that run as this trial. Remote workdirs
    (gs://...) are not checked."""
    for t in range(len(self.names)):
      workdir = self.workdir(t)
      if "://" in workdir:
        continue
      path = os.path.join(workdir, MARKER)
      try:
        with open(path) as f:
          mark = json.load(f)
      except (FileNotFoundError, NotADirectoryError):
        continue  # not started yet (or by a sweep.py that wrote no markers)
      except (OSError, ValueError) as e:
        raise SpecError(f"trial workdir {workdir!r}: cannot read {path} ({e})") from None
      mine = json.loads(json.dumps(self.marker(t)))
      if not isinstance(mark, dict) or mark.get("sweep_dir") != mine["sweep_dir"]:
        other = f"the sweep in {mark.get('sweep_dir') if isinstance(mark, dict) else '?'}"
      elif mark.get("overrides") != mine["overrides"]:
        other = f"an earlier sweep in {mine['sweep_dir']} with other overrides " \
                f"({json.dumps(mark.get('overrides'))})"
      else:
        continue
      raise SpecError(f"trial workdir {workdir!r} already holds a run of {other}; use another "
                      f"--workdir_root (or delete {path} to let {self.names[t]} resume that run)")

  # ------------------------------------------------------------------ commands

  def trainer_args(self, t: int, rung: int) -> list[str]:
    """Every trainer flag after --config and --workdir."""
    args = [f"--config.{k}={format_value(v)}" for k, v in self.d["fixed"].items()]
    args += [f"--config.{k}={format_value(v)}" for k, v in self.d["trials"][t]["overrides"].items()]
    if self.budgets[rung] is not None:
      args.append(f"--config.num_train_steps={self.budgets[rung]}")
    return args + list(self.d["extra_args"])

  def command(self, t: int, rung: int, python: str = sys.executable) -> list[str]:
    trainer = self.trainer or [python, "-m", "experiments.train"]
    return trainer + [f"--config={self.d['config']}", f"--workdir={self.workdir(t)}"] + \
        self.trainer_args(t, rung)

  def emit_line(self, t: int, rung: int, kind: str, sbatch_flags: list[str]) -> str:
    """One shell line that runs job (t, rung) elsewhere and records its exit status."""
    log, rc = shlex.quote(self.log_path(t)), shlex.quote(self.rc_path(t))
    if kind == "slurm":  # slurm.sbatch writes RETURNCODE_FILE itself, on the compute node
      env = _env_prefix({"CONFIG": self.d["config"], "WORKDIR": self.workdir(t),
                         "RETURNCODE_FILE": self.rc_path(t)})
      name = f"{os.path.basename(os.path.normpath(self.dir))}-{self.names[t]}"
      cmd = ["sbatch", f"--job-name={name}", f"--output={self.log_path(t)}", "--open-mode=append",
             *sbatch_flags, os.path.relpath(os.path.join(HERE, "slurm.sbatch"))]
      return env + shlex.join(cmd + self.trainer_args(t, rung))
    if kind == "tpu":
      cmd = [os.path.relpath(os.path.join(HERE, "tpu_vm.sh")), f"--config={self.d['config']}",
             f"--workdir={self.workdir(t)}", "--"] + self.trainer_args(t, rung)
    else:
      cmd = self.command(t, rung, python="python")  # the cluster's python, not this venv's
    return f"{shlex.join(cmd)} >> {log} 2>&1; echo $? > {rc}"

  def describe(self, t: int) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in self.d["trials"][t]["overrides"].items())

  def rung_text(self, rung: int) -> str:
    if self.budgets[rung] is None:
      return ""
    return f" rung {rung + 1}/{len(self.budgets)} ({self.budgets[rung]} steps)"


def _write_json(path: str, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)  # never a half-written file if the sweep is killed


# ----------------------------------------------------------------------------- results

def collect_results(sweep: Sweep, running: set = frozenset()) -> tuple[list[dict], bool]:
  """One row per trial, best first; and whether the sweep has finished."""
  scores, failed, records = sweep.scan()
  busy = set(running) | sweep.waiting(scores, failed)
  todo = sweep.plan(scores, failed, busy)
  finished = not todo and not busy
  metric, top = sweep.d["metric"], sweep.budgets[-1]
  rows = []
  for t, name in enumerate(sweep.names):
    metrics = final_metrics(records[t])
    steps = last_step(records[t])
    rc = sweep.returncode(t)
    if t in running:
      status = "running"
    elif t in failed:
      status = "failed"
    elif top is None:
      status = "ok" if rc == 0 else "pending"
    elif steps is not None and steps >= top:
      status = "ok"
    elif finished and t in scores[0]:
      status = "stopped"
    else:
      status = "pending"
    value = metrics.get(metric)
    rows.append({"trial": name, "status": status, "returncode": rc, "steps": steps,
                 "overrides": sweep.d["trials"][t]["overrides"], metric: value,
                 "metrics": metrics, "workdir": sweep.workdir(t), "log": sweep.log_path(t)})
  halving = sweep.d["halving"] is not None

  def key(row):
    score = sweep.score(row[metric])
    if score is None or row["status"] == "failed":
      return (2, 0, 0.0, row["trial"])
    # Pending and running trials have partial metrics: they follow the finished ones, unranked.
    done = row["status"] in ("ok", "stopped")
    # Under halving a trial stopped early was judged on fewer steps: rank by budget first.
    return (0 if done else 1, -(row["steps"] or 0) if halving else 0, score, row["trial"])

  rows.sort(key=key)
  rank = 0
  for row in rows:
    if key(row)[0] == 0:
      rank += 1
      row["rank"] = rank
    else:
      row["rank"] = None
  return rows, finished


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}"
  return format_value(value)


def format_table(rows: list[dict], metric: str) -> str:
  params = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
  split = metric.split("/", 1)[0] + "/"
  others = sorted({m for row in rows for m in row["metrics"]
                   if m.startswith(split) and m != metric})
  header = ["rank", "trial", "status", "steps"] + params + [metric] + others
  body = [[_cell(row["rank"]), row["trial"], row["status"]
           + (f" (rc={row['returncode']})" if row["status"] == "failed"
              and row["returncode"] not in (None, 0) else ""),
           _cell(row["steps"])]
          + [_cell(row["overrides"].get(p)) for p in params]
          + [_cell(row[metric])] + [_cell(row["metrics"].get(m)) for m in others]
          for row in rows]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in [header] + body)


def write_results(sweep: Sweep, rows: list[dict]):
  metric = sweep.d["metric"]
  _write_json(os.path.join(sweep.dir, "results.json"),
              {"metric": metric, "mode": sweep.d["mode"], "trials": rows})
  params = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
  names = sorted({m for row in rows for m in row["metrics"]})
  with open(os.path.join(sweep.dir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["rank", "trial", "status", "returncode", "steps"] + params + names)
    for row in rows:
      w.writerow([row["rank"], row["trial"], row["status"], row["returncode"], row["steps"]]
                 + [format_value(row["overrides"][p]) if p in row["overrides"] else ""
                    for p in params]
                 + [row["metrics"].get(m, "") for m in names])


def report(sweep: Sweep, out=None) -> list:
  """Prints the results table (and notes on failures) and writes results.json/csv."""
  out = out or sys.stdout
  rows, finished = collect_results(sweep)
  metric = sweep.d["metric"]
  print(f"\nSweep {sweep.dir}: {len(rows)} trials, sorted by {metric} "
        f"({'higher' if sweep.d['mode'] == 'max' else 'lower'} is better)"
        + ("" if finished else "; not finished"), file=out)
  print(format_table(rows, metric), file=out)
  missing = [r["trial"] for r in rows if r["status"] in ("ok", "stopped") and r[metric] is None]
  if missing:
    found = sorted({m for r in rows for m in r["metrics"]})
    print(f"warning: {metric} is missing from {len(missing)} finished trial(s) "
          f"({', '.join(missing[:5])}); metrics found: {', '.join(found) or 'none'}", file=out)
  failed = [r for r in rows if r["status"] == "failed"]
  for r in failed[:5]:
    print(f"{r['trial']} failed{_last_line(r['log'])}; log: {r['log']}", file=out)
  if len(failed) > 5:
    print(f"... and {len(failed) - 5} more failed trials", file=out)
  best = next((r for r in rows if r["rank"] == 1), None)  # only finished trials are ranked
  if best is not None:
    flags = shlex.join(f"--config.{k}={format_value(v)}" for k, v in best["overrides"].items())
    print(f"best: {best['trial']} {metric}={_cell(best[metric])}  {flags}", file=out)
  elif not any(r["status"] in ("ok", "stopped") for r in rows) and \
      any(r["status"] in ("pending", "running") for r in rows):
    print("no best trial yet: no trial has finished", file=out)
  write_results(sweep, rows)
  print(f"wrote {os.path.join(sweep.dir, 'results.json')} and results.csv", file=out)
  return rows


def _last_line(log: str) -> str:
  try:
    with open(log, errors="replace") as f:
      lines = [l.strip() for l in f.read().splitlines()[-50:] if l.strip()]
  except OSError:
    return ""
  return f": {lines[-1][:200]}" if lines else ""


# ----------------------------------------------------------------------------- running

def _now() -> str:
  return datetime.datetime.now().strftime("%H:%M:%S")


def _env_prefix(env: dict) -> str:
  return "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())


def visible_gpus() -> list[str] | None:
  """The GPUs this sweep may hand out: CUDA_VISIBLE_DEVICES as set by the caller (ids or
  UUIDs), or None when it is unset (every GPU, numbered from 0)."""
  text = os.environ.get("CUDA_VISIBLE_DEVICES")
  if text is None:
    return None
  return [g.strip() for g in text.split(",") if g.strip()]


def check_gpus(parallel: int, gpus_per_trial: int | None, visible: list[str] | None):
  if gpus_per_trial and visible is not None and parallel * gpus_per_trial > len(visible):
    raise SpecError(f"--parallel {parallel} x --gpus_per_trial {gpus_per_trial} needs "
                    f"{parallel * gpus_per_trial} GPUs, but CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} lists {len(visible)}")


def _slot_env(slot: int, gpus_per_trial: int | None, visible: list[str] | None = None) -> dict:
  if not gpus_per_trial:
    return {}
  first = slot * gpus_per_trial
  ids = [str(g) for g in range(first, first + gpus_per_trial)] if visible is None \
      else visible[first:first + gpus_per_trial]
  return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}


def _say(text: str):
  try:
    print(text, flush=True)
  except OSError:  # stdout was the terminal that just hung up
    pass


def _on_hangup():
  """After SIGHUP the terminal is gone and writing to it fails: send output to /dev/null."""
  for name in ("stdout", "stderr"):
    stream = getattr(sys, name)
    try:
      tty = stream.isatty()
    except (OSError, ValueError):
      tty = True
    if tty:
      setattr(sys, name, open(os.devnull, "w"))


def run_local(sweep: Sweep, parallel: int, gpus_per_trial: int | None, grace: float = 60.0) -> int:
  """Runs every job here, `parallel` at a time, until the sweep is done. Returns 130 if
  interrupted (trials get SIGTERM, so they checkpoint; a second interrupt kills them),
  else 0."""
  running = {}  # trial -> (Popen, rung, slot, start time, log file)
  free_slots = list(range(parallel))
  visible = visible_gpus()

  def start(t, rung):
    slot = free_slots.pop(0)
    env = _slot_env(slot, gpus_per_trial, visible)
    sweep.start_job(t, rung)
    cmd = sweep.command(t, rung)
    log = open(sweep.log_path(t), "a")
    log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}"
              f"{sweep.rung_text(rung)}: {_env_prefix(env)}{shlex.join(cmd)}\n")
    log.flush()
    where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if env else ""
    print(f"[{_now()}] start {sweep.names[t]}{sweep.rung_text(rung)}{where}: "
          f"{sweep.describe(t)}", flush=True)
    try:
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **env}, start_new_session=True)
    except OSError as e:  # e.g. a --trainer that does not exist: this trial fails, not the sweep
      log.write(f"cannot start {cmd[0]}: {e}\n")
      running[t] = (None, rung, slot, time.time(), log)
      finish(t, 127)
      return
    running[t] = (proc, rung, slot, time.time(), log)

  def finish(t, returncode):
    _, rung, slot, started, log = running.pop(t)
    log.close()
    free_slots.append(slot)
    with open(sweep.rc_path(t), "w") as f:
      f.write(f"{returncode}\n")
    took = f"{time.time() - started:.0f} s"
    if returncode != 0:
      print(f"[{_now()}] FAILED {sweep.names[t]}{sweep.rung_text(rung)} with exit status "
            f"{returncode} after {took}; log: {sweep.log_path(t)}", flush=True)
    else:
      metrics = final_metrics(read_metrics(sweep.workdir(t)), sweep.budgets[rung])
      print(f"[{_now()}] done  {sweep.names[t]}{sweep.rung_text(rung)}: "
            f"{sweep.d['metric']}={_cell(metrics.get(sweep.d['metric']))} ({took})", flush=True)

  def on_term(signum, frame):  # a SLURM or shell kill, or a closed terminal, acts like Ctrl-C
    if signum == signal.SIGHUP:
      _on_hangup()
    raise KeyboardInterrupt

  # The trials run in their own sessions, so nothing but this process stops them. A signal
  # ignored by whoever started us (nohup) stays ignored.
  old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
  for s in (signal.SIGTERM, signal.SIGHUP):
    if old[s] != signal.SIG_IGN:
      signal.signal(s, on_term)
  try:
    replan = True  # the state on disk only changes when a job ends
    while True:
      while replan and free_slots:
        scores, failed, _ = sweep.scan()
        jobs = sweep.plan(scores, failed, set(running))[:len(free_slots)]
        for t, rung in jobs:
          start(t, rung)
        replan = any(t not in running for t, _ in jobs)  # one failed to start
      if not running:
        return 0
      time.sleep(0.1)
      for t in [t for t, (proc, *_) in running.items() if proc.poll() is not None]:
        finish(t, running[t][0].returncode)
        replan = True
  except KeyboardInterrupt:
    procs = [proc for proc, *_ in running.values() if proc is not None]
    try:
      for proc in procs:
        proc.terminate()  # the trainer writes a checkpoint on SIGTERM
      _say(f"\n[{_now()}] interrupted: stopping {len(procs)} trial(s) (interrupt again to kill "
           "them now); rerun the same command to resume the sweep")
      deadline = time.time() + grace
      for proc in procs:
        try:
          proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
    except KeyboardInterrupt:  # a second Ctrl-C or kill: stop waiting for the checkpoints
      for s in old:
        if old[s] != signal.SIG_IGN:
          signal.signal(s, signal.SIG_IGN)
      alive = [proc for proc in procs if proc.poll() is None]
      for proc in alive:
        proc.kill()
      for proc in alive:
        proc.wait()
      _say(f"[{_now()}] interrupted again: killed {len(alive)} trial(s); they resume from their "
           "last checkpoint")
    for *_, log in running.values():
      log.close()
    running.clear()  # no return codes written: these trials resume on the next run
    return 130
  finally:
    for s, handler in old.items():
      if handler is not None:  # None: not set from Python, so never changed here
        signal.signal(s, handler)


def print_plan(sweep: Sweep, out):
  n, h = len(sweep.names), sweep.d["halving"]
  text = f"{n} trials of {sweep.d['config']} in {sweep.dir}"
  if h:
    counts = survivors(n, len(sweep.budgets), h["eta"])
    cost = sum(c * (b - prev) for c, b, prev in zip(counts, sweep.budgets, [0] + sweep.budgets))
    text += (f"; {'asynchronous' if h['asynchronous'] else 'successive'} halving, eta={h['eta']}:"
             f" {' -> '.join(f'{c} x {b}' for c, b in zip(counts, sweep.budgets))} steps"
             f" (about {cost} steps in all, {n * sweep.budgets[-1]} without halving)")
  print(text, file=out, flush=True)


# ----------------------------------------------------------------------------- main

def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch/sweep.py", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
      formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
      usage="%(prog)s --sweep_dir DIR [what to sweep] [options] [-- trainer flags]")
  g = p.add_argument_group("what to sweep (flags add to --spec)")
  g.add_argument("--spec", metavar="FILE", help="sweep spec: JSON, or Python with get_sweep()")
  g.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                 help="try every value (repeat for a product grid)")
  g.add_argument("--random", action="append", metavar="KEY=DIST",
                 help="draw from DIST (see distributions below)")
  g.add_argument("--num_trials", type=int, metavar="N",
                 help="random draws (required with --random)")
  g.add_argument("--seed", type=int, metavar="N", help="seed of the random draws (default 0)")
  g.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="a fixed override for every trial; so are --config.KEY=VALUE flags")
  g.add_argument("--config", metavar="FILE", help=f"config file (default {DEFAULT_CONFIG})")
  h = p.add_argument_group("successive halving")
  h.add_argument("--halving", action="store_true",
                 help="train all trials --min_steps, keep the best 1/eta, multiply the budget "
                      "by eta, ... up to --max_steps")
  h.add_argument("--asha", action="store_true",
                 help="asynchronous halving (ASHA): promote without waiting for a rung to finish")
  h.add_argument("--eta", type=int, metavar="N", help="keep 1/eta of the trials at each rung (default 3)")
  h.add_argument("--min_steps", type=int, metavar="STEPS", help="step budget of the first rung")
  h.add_argument("--max_steps", type=int, metavar="STEPS", help="step budget of the last rung")
  r = p.add_argument_group("running")
  r.add_argument("--sweep_dir", required=True, metavar="DIR",
                 help="the sweep's state, logs and results; trial workdirs go here too")
  r.add_argument("--workdir_root", metavar="DIR",
                 help="put trial workdirs here instead (e.g. gs://bucket/x); a local trial "
                      "workdir started by another sweep is refused (remote ones are not checked)")
  r.add_argument("--parallel", type=int, default=1, metavar="N", help="trials run at once here (default 1)")
  r.add_argument("--gpus_per_trial", type=int, metavar="G",
                 help="give each running trial its own GPUs (CUDA_VISIBLE_DEVICES): slices of "
                      "the caller's CUDA_VISIBLE_DEVICES if set, else GPUs from 0")
  r.add_argument("--emit", choices=("shell", "slurm", "tpu"),
                 help="print one command per trial to run elsewhere instead of running them")
  r.add_argument("--sbatch_flags", default="", metavar="FLAGS", help="extra sbatch flags for --emit slurm")
  r.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the commands; run nothing and write nothing")
  r.add_argument("--report", action="store_true", help="only print the results table")
  r.add_argument("--retry_failed", action="store_true", help="run failed trials again")
  r.add_argument("--resubmit", action="store_true",
                 help="with --emit: emit again jobs emitted earlier that have not finished")
  r.add_argument("--trainer", metavar="CMD",
                 help="command that trains one trial, given --config, --workdir and overrides "
                      "(default: python -m experiments.train)")
  m = p.add_argument_group("results")
  m.add_argument("--metric", metavar="SPLIT/NAME", help=f"SPLIT/NAME to sort and select by (default {DEFAULT_METRIC})")
  m.add_argument("--mode", choices=("min", "max"),
                 help="whether lower or higher is better (default: from the metric's name)")
  return p


def _spec_given(args, extra) -> bool:
  given = [args.num_trials, args.seed, args.eta, args.min_steps, args.max_steps]
  return bool(args.spec or args.grid or args.random or args.set or extra or args.config
              or args.halving or args.asha or args.workdir_root
              or any(v is not None for v in given))


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  parser = make_parser()
  args, unknown = parser.parse_known_args(argv)
  bad = [a for a in unknown if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (trainer flags go after --)")
  extra = unknown + extra
  try:
    return _main(args, extra)
  except SpecError as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2


def _main(args, extra) -> int:
  if args.parallel < 1:
    raise SpecError(f"--parallel must be >= 1, got {args.parallel}")
  if args.gpus_per_trial is not None and args.gpus_per_trial < 1:
    raise SpecError(f"--gpus_per_trial must be >= 1, got {args.gpus_per_trial}")
  if args.trainer is not None and args.emit in ("slurm", "tpu"):
    raise SpecError(f"--trainer does not apply to --emit {args.emit}: the launch script runs "
                    "python -m experiments.train")
  trainer = None
  if args.trainer is not None:
    trainer = shlex.split(args.trainer)
    if not trainer:
      raise SpecError("--trainer is empty")
  stored_path = os.path.join(args.sweep_dir, "sweep.json")
  stored = None
  if os.path.exists(stored_path):
    with open(stored_path) as f:
      stored = json.load(f)
  if args.report or not _spec_given(args, extra):
    if stored is None:
      raise SpecError(f"--sweep_dir {args.sweep_dir!r} holds no sweep (no sweep.json); "
                      "nothing to sweep: give --grid, --random or --spec")
    definition = dict(stored)
    if args.metric:  # re-rank an existing sweep by another metric
      definition["metric"] = check_metric(args.metric)
      definition["mode"] = args.mode or infer_mode(args.metric)
    elif args.mode:
      definition["mode"] = args.mode
  else:
    definition = build_sweep(args, extra)
    if stored is not None:
      fresh = json.loads(json.dumps(definition))
      defaults = {DEFAULT_CONFIG, os.path.join(ROOT, DEFAULT_CONFIG)}
      if {fresh["config"], stored.get("config")} <= defaults:
        fresh["config"] = stored["config"]  # the default, as written from another directory
      diff = [k for k in IDENTITY_KEYS if stored.get(k) != fresh.get(k)]
      if diff:
        raise SpecError(f"--sweep_dir {args.sweep_dir!r} already holds a different sweep (its "
                        f"{', '.join(diff)} differ; see {stored_path}); use a new --sweep_dir, "
                        "or pass only --sweep_dir to continue that one")
  if definition["halving"] and definition["halving"]["asynchronous"] and args.emit:
    raise SpecError("--asha decides promotions as trials finish, so it needs local runs; "
                    "use --halving with --emit")

  sweep = Sweep(definition, args.sweep_dir, trainer)
  if args.report:
    report(sweep)
    return 0
  check_config(definition["config"], args.emit)
  visible = visible_gpus()
  if not args.emit:
    check_gpus(args.parallel, args.gpus_per_trial, visible)
  sweep.check_workdirs()

  out = sys.stderr if args.emit or args.dry_run else sys.stdout
  print_plan(sweep, out)
  if args.dry_run:
    scores, failed, _ = sweep.scan()
    busy = set() if not args.emit or args.resubmit else sweep.waiting(scores, failed)
    jobs = sweep.plan(scores, failed, busy)
    if jobs:  # the commands write their logs there
      print(f"mkdir -p {shlex.quote(os.path.join(args.sweep_dir, 'logs'))}")
    for i, (t, rung) in enumerate(jobs):
      if args.emit:
        print(sweep.emit_line(t, rung, args.emit, shlex.split(args.sbatch_flags)))
      else:
        env = _slot_env(i % args.parallel, args.gpus_per_trial, visible)
        print(f"{_env_prefix(env)}{shlex.join(sweep.command(t, rung))} "
              f">> {shlex.quote(sweep.log_path(t))} 2>&1")
    if sweep.budgets[0] is not None:
      print("# later rungs depend on these results", file=out)
    return 0

  try:
    os.makedirs(os.path.join(args.sweep_dir, "logs"), exist_ok=True)
  except OSError as e:
    raise SpecError(f"--sweep_dir {args.sweep_dir!r}: cannot create it ({e.strerror})") from None
  lock = _lock(args.sweep_dir)
  try:
    return _drive(args, sweep, definition, stored_path, out)
  finally:
    lock.close()


def _lock(sweep_dir: str):
  """Holds <sweep_dir>/.lock while this process drives the sweep: a second driver would
  start a second trainer in the workdir of every running trial."""
  path = os.path.join(sweep_dir, ".lock")
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    pid = f.read().strip()
    f.close()
    raise SpecError(f"--sweep_dir {sweep_dir!r} is in use by another sweep.py"
                    f"{f' (pid {pid})' if pid else ''}; wait for it to end or stop it") from None
  f.truncate(0)
  f.write(f"{os.getpid()}\n")
  f.flush()
  return f


def _drive(args, sweep: Sweep, definition: dict, stored_path: str, out) -> int:
  """Runs or emits the sweep's next jobs; called with the sweep's lock held."""
  _write_json(stored_path, definition)
  if args.retry_failed:
    _, failed, _ = sweep.scan()
    for t in failed:
      if os.path.exists(sweep.rc_path(t)):
        os.remove(sweep.rc_path(t))
      sweep.jobs.pop(sweep.names[t], None)
    _write_json(sweep.jobs_path, sweep.jobs)

  if args.emit:
    scores, failed, _ = sweep.scan()
    waiting = set() if args.resubmit else sweep.waiting(scores, failed)
    jobs = sweep.plan(scores, failed, waiting)
    for t, rung in jobs:
      sweep.start_job(t, rung)
      print(sweep.emit_line(t, rung, args.emit, shlex.split(args.sbatch_flags)), flush=True)
    if waiting:
      print(f"# {len(waiting)} job(s) emitted earlier have not finished: "
            f"{', '.join(sweep.names[t] for t in sorted(waiting))}; rerun this command when they "
            "have (or add --resubmit to emit them again)", file=out)
    elif jobs and sweep.budgets[0] is not None:
      print("# when these jobs have finished, rerun this command for the next rung", file=out)
    elif not jobs:
      report(sweep, out=out)
    return 0

  status = run_local(sweep, args.parallel, args.gpus_per_trial)
  rows = report(sweep)
  if status == 0 and all(r["status"] == "failed" for r in rows):
    return 1  # every trial failed: something is wrong with the setup, not the hyperparameters
  return status


if __name__ == "__main__":
  sys.exit(main())
