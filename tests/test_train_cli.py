"""What a user of `python -m experiments.train` / `experiments.sample` meets: resuming with a
changed config, bad values refused up front naming their config key, one-line errors,
Ctrl-C, the progress rate."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from gru_jax import train
from tests.e2e_util import ROOT, checkpoint_steps, signal_after_a_checkpoint
from tests.test_train_units import _tiny_digits


def _warnings(caplog):
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _history(wd):
  with open(os.path.join(wd, "config_history.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_resume_with_changed_settings_warns_and_keeps_the_history(tmp_path, caplog):
  wd = str(tmp_path / "wd")
  c = _tiny_digits(steps=2)
  train.train_and_evaluate(c, wd)
  original = json.load(open(os.path.join(wd, "config.json")))
  assert [h["start_step"] for h in _history(wd)] == [0]
  c.learning_rate, c.num_train_steps = 1e-2, 4
  c.model.backend, c.model.unroll = "scan", 2  # how, not what: no model change
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, wd)
  warned = _warnings(caplog)
  assert "resuming" in warned and "at step 2" in warned
  for text in ("config.learning_rate was 0.003, now 0.01", "config.num_train_steps was 2, now 4",
               "config.model.backend was 'auto', now 'scan'", "config.model.unroll was 1, now 2"):
    assert text in warned, warned
  # config.json still tells how the run started; the history tells the rest.
  assert json.load(open(os.path.join(wd, "config.json"))) == original
  hist = _history(wd)
  assert [h["start_step"] for h in hist] == [0, 2]
  assert hist[1]["config"]["learning_rate"] == 0.01
  assert hist[1]["changed"]["config.learning_rate"] == {"was": 0.003, "now": 0.01}
  assert hist[0]["config"]["learning_rate"] == 0.003
  assert checkpoint_steps(wd)[-1] == 4
  # Asking for fewer steps than already run: said, and nothing trains.
  c.num_train_steps = 3
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, wd)
  assert "config.num_train_steps=3 is below step 4" in _warnings(caplog)
  assert checkpoint_steps(wd)[-1] == 4
  # The same config as the last start: nothing differs.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, wd)
  assert "differ" not in _warnings(caplog) and "below step 4" in _warnings(caplog)
  assert [h["start_step"] for h in _history(wd)] == [0, 2, 4, 4]


def test_resume_refusal_names_the_model_keys_that_differ(tmp_path):
  wd = str(tmp_path / "wd")
  c = _tiny_digits(steps=1)
  train.train_and_evaluate(c, wd)
  c.model.hidden_sizes, c.model.dropout = (4,), 0.25
  t0 = time.time()
  with pytest.raises(train.TrainingError) as e:
    train.train_and_evaluate(c, wd)
  msg = str(e.value)
  assert "different model config" in msg
  assert "config.model.hidden_sizes was [8, 8], now [4]" in msg
  assert "config.model.dropout was 0.5, now 0.25" in msg
  assert "batch_norm" not in msg
  assert time.time() - t0 < 5  # refused before the data is loaded


@pytest.mark.parametrize("key,value,message", [
    ("learning_rate", -0.01, "config.learning_rate must be > 0, got -0.01"),
    ("learning_rate", 0.0, "config.learning_rate must be > 0, got 0.0"),
    ("seed", -1, "config.seed must be an int >= 0, got -1"),
    ("model.dropout", -0.1, r"config.model.dropout must be in \[0, 1\), got -0.1"),
    ("model.dropout", 1.5, r"config.model.dropout must be in \[0, 1\), got 1.5"),
    ("model.recurrent_dropout", -0.5, r"config.model.recurrent_dropout must be in \[0, 1\)"),
    ("model.input_dropout", 1.0, r"config.model.input_dropout must be in \[0, 1\)"),
    ("model.zoneout", 1.0, r"config.model.zoneout must be in \[0, 1\), got 1.0"),
    ("model.attention", "bahdanau", "config.model.attention must be one of .*got 'bahdanau'"),
    ("model.attention_size", -1, "config.model.attention_size must be an int >= 0, got -1"),
    ("model.backend", "cuda", "config.model.backend must be one of .*got 'cuda'"),
    ("model.variant", "foo", "config.model.variant must be one of .*got 'foo'"),
    ("optimizer.warmup_steps", 100, "config.optimizer.warmup_steps=100 exceeds the run's 2 "
                                    "training steps"),
    ("class_weights", "inverse", "config.class_weights must be"),
])
def test_bad_values_are_refused_before_the_data_loads(tmp_path, monkeypatch, key, value,
                                                      message):
  def no_loading(*a, **k):
    raise AssertionError("the data was loaded before the config was checked")
  monkeypatch.setattr(train.data_lib, "load", no_loading)
  c = _tiny_digits(steps=2)
  c.optimizer.schedule = "warmup_cosine"
  sub, _, leaf = key.rpartition(".")
  (c[sub] if sub else c)[leaf] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_warmup_longer_than_an_epochs_run_is_refused_without_a_workdir(tmp_path):
  c = _tiny_digits(steps=0)
  c.num_epochs, c.optimizer.schedule, c.optimizer.warmup_steps = 1, "warmup_cosine", 10 ** 6
  with pytest.raises(ValueError, match=r"config.optimizer.warmup_steps=1000000 exceeds the "
                                       r"run's \d+ training steps"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_an_unreachable_public_dataset_fails_at_once_and_leaves_no_workdir(tmp_path,
                                                                          monkeypatch):
  from gru_jax.data import base, public
  from tests.test_configs import load_config
  monkeypatch.setitem(public.HOSTS, "mnist", ("gru-jax-test.invalid", 443))
  c = load_config("mnist")
  c.dataset.data_dir = str(tmp_path / "empty")
  t0 = time.time()
  with pytest.raises(base.DataUnavailableError,
                     match="could not prepare TFDS dataset 'mnist'.*not prepared there and "
                           "gru-jax-test.invalid is unreachable"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert time.time() - t0 < 30
  assert not (tmp_path / "wd").exists()


def _cli(*args, module="experiments.train", prelude="pass", timeout=120):
  """The entrypoint in a subprocess, optionally after some setup code (``prelude``)."""
  code = (f"import runpy, sys; sys.argv = {['x', *args]!r}; {prelude}; "
          f"runpy.run_module({module!r}, run_name='__main__')")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_cli_errors_are_one_line_printed_once(tmp_path):
  r = _cli("--config=experiments/configs/nope.py", f"--workdir={tmp_path}/a")
  assert r.returncode == 1
  assert r.stderr.strip() == "error: config file experiments/configs/nope.py not found"
  r = _cli("--config=experiments/configs/digits.py", f"--workdir={tmp_path}/b",
           "--config.learning_rate=-0.01")
  assert r.returncode == 1
  assert [l for l in r.stderr.splitlines() if "learning_rate" in l] == [
      "error: config.learning_rate must be > 0, got -0.01"], r.stderr
  # An offline dataset: one line (no traceback), at once, and no workdir left behind.
  r = _cli("--config=experiments/configs/mnist.py", f"--workdir={tmp_path}/c",
           f"--config.dataset.data_dir={tmp_path}/empty",
           prelude="from gru_jax.data import public; "
                   "public.HOSTS['mnist'] = ('gru-jax-test.invalid', 443)")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  errors = [l for l in r.stderr.splitlines() if "could not prepare" in l]
  assert len(errors) == 1 and errors[0].startswith("error: could not prepare TFDS dataset 'mnist'")
  assert not (tmp_path / "c").exists()
  # A --workdir that is a file.
  (tmp_path / "f").write_text("x")
  r = _cli("--config=experiments/configs/digits.py", f"--workdir={tmp_path}/f")
  assert r.returncode == 1 and r.stderr.strip() == f"error: --workdir {tmp_path}/f is a file, not a directory"


def test_help_lists_the_config_flag():
  r = _cli("--help")  # (absl's --help exits 1)
  assert "--config: Training config file." in r.stdout


def test_sample_checks_its_flags_before_restoring(tmp_path):
  from experiments import sample
  with pytest.raises(ValueError, match=f"--workdir {tmp_path}/nope does not exist"):
    sample.check_flags(str(tmp_path / "nope"), "a", 5, 1.0)
  # tmp_path holds no checkpoint: each flag error comes before any restore would fail.
  for args, message in [(("a", 5, 0.0), "--temperature must be a finite number > 0, got 0.0"),
                        (("a", -5, 1.0), "--length must be >= 0, got -5"),
                        (("", 5, 1.0), "--prompt must not be empty")]:
    with pytest.raises(ValueError, match=message):
      sample.sample_text(str(tmp_path), *args, seed=0)
  with pytest.raises(ValueError, match="--beam_size must be >= 1, got 0"):
    sample.sample_text(str(tmp_path), "a", 5, 1.0, seed=0, beam_size=0)
  for kwargs, message in [(dict(top_k=0), "--top_k must be >= 1, got 0"),
                          (dict(top_p=0.0), r"--top_p must be in \(0, 1\], got 0.0"),
                          (dict(top_p=1.5), r"--top_p must be in \(0, 1\], got 1.5")]:
    with pytest.raises(ValueError, match=message):
      sample.sample_text(str(tmp_path), "a", 5, 1.0, seed=0, **kwargs)
  r = _cli(f"--workdir={tmp_path}/nope", module="experiments.sample")
  assert r.returncode == 1 and r.stderr.strip() == f"error: --workdir {tmp_path}/nope does not exist"
  r = _cli(f"--workdir={tmp_path}/nope", module="experiments.beam_eval")
  assert r.returncode == 1 and r.stderr.strip() == f"error: workdir {tmp_path}/nope does not exist"
  r = _cli(f"--workdir={tmp_path}", "--beam_sizes=2,0", module="experiments.beam_eval")
  assert r.returncode == 1 and r.stderr.strip() == "error: beam sizes must be ints >= 1, got ['2', '0']"
  r = _cli(f"--workdir={tmp_path}", "--length_bins=20,10", module="experiments.beam_eval")
  assert r.returncode == 1 and r.stderr.strip() == ("error: length bin edges must be at least "
                                                    "two increasing ints, got ['20', '10']")


def test_progress_rate_leaves_out_compile_and_evaluation():
  now = [0.0]
  p = train._Progress(clock=lambda: now[0])
  assert p.rate(1) is None
  now[0] = 30.0  # step 1 compiled for 30 s
  p.restart(1)
  now[0] += 9 * 0.1  # steps 2-10 at 10 steps/s
  assert p.rate(10) == pytest.approx(10.0)
  p.stop(10)
  now[0] += 20.0  # evaluating and checkpointing
  p.restart(10)
  now[0] += 10 * 0.1
  assert p.rate(20) == pytest.approx(10.0)
  p.stop(20)
  now[0] += 2.0  # a second evaluation, compiled: 2 s
  p.restart(20)
  now[0] += 0.1
  # 79 steps left at 10 steps/s, and 3 evaluations at 2 s (the first one, compiling, left out).
  assert p.eta(21, 100, 3) == pytest.approx(7.9 + 6.0)
  # Evaluations every 10 steps and checkpoints every 25 after step 21 to 100: 25, 30, 40, 50,
  # 60, 70, 75, 80, 90, 100.
  assert train._pauses_between(21, 100, 10, 25) == 10
  assert train._pauses_between(21, 101, 10, 25) == 11  # and the last step
  assert train._pauses_between(100, 100, 10, 25) == 0


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_130(tmp_path):
  wd = str(tmp_path)
  rc, out = signal_after_a_checkpoint(wd, signal.SIGINT)
  assert rc == 130, out
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
  stopped = max(checkpoint_steps(wd))
  assert 8 <= stopped < 2000, out
  assert f"SIGINT: checkpoint written at step {stopped}; exiting" in out, out
