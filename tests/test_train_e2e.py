"""The experiment entrypoint end to end: resume after SIGKILL/SIGTERM, errors, parallel modes."""
import os
import signal

import chex
import jax
import numpy as np
import pytest

from tests.e2e_util import (FAST, checkpoint_steps, metrics, restore_params, run_train,
                            signal_after_a_checkpoint)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted short run that the interrupted ones must reproduce exactly."""
  wd = str(tmp_path_factory.mktemp("ref"))
  r = run_train(wd, *FAST)
  assert r.returncode == 0, r.stdout + r.stderr
  return wd, r


def test_run_writes_metrics_checkpoints_and_progress(reference_run):
  wd, r = reference_run
  log = r.stdout + r.stderr
  assert "steps/s" in log and "ETA" in log
  lines = metrics(wd)
  train_steps = [l["step"] for l in lines if l["split"] == "train"]
  assert train_steps == list(range(1, 25))
  evals = [l for l in lines if l["split"] == "validation"]
  assert [l["step"] for l in evals] == [8, 16, 24]
  # Nothing dropped from evaluation: every validation/test example counted once.
  n_val = {l["count"] for l in evals}
  n_test = {l["count"] for l in lines if l["split"] == "test"}
  assert len(n_val) == 1 and len(n_test) == 1
  from gru_jax import data
  assert n_val.pop() == len(data.load("sequential_digits", "validation")[0]["labels"])
  assert n_test.pop() == len(data.load("sequential_digits", "test")[0]["labels"])
  last = evals[-1]
  assert 0.0 <= last["accuracy"] <= 1.0 and np.isfinite(last["loss"])
  assert len(last["per_class_recall"]) == 10 and np.array(last["confusion_matrix"]).shape == (10, 10)
  assert checkpoint_steps(wd)[-1] == 24
  assert os.listdir(os.path.join(wd, "tensorboard"))


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(reference_run, tmp_path):
  ref_wd, _ = reference_run
  wd = str(tmp_path)
  r = run_train(wd, *FAST, "--config.debug_kill_at_step=13")
  assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
  assert max(checkpoint_steps(wd)) < 24
  r = run_train(wd, *FAST)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "Resumed from" in r.stdout + r.stderr
  assert metrics(wd) == metrics(ref_wd)
  chex.assert_trees_all_equal(restore_params(wd), restore_params(ref_wd))


@pytest.mark.slow
def test_sigterm_checkpoints_then_resume_equals_uninterrupted(reference_run, tmp_path):
  ref_wd, _ = reference_run
  wd = str(tmp_path)
  rc, out = signal_after_a_checkpoint(wd, signal.SIGTERM)
  assert rc == 143, out
  stopped = max(checkpoint_steps(wd))
  assert 8 <= stopped < 2000
  assert f"SIGTERM: checkpoint written at step {stopped}; exiting" in out, out
  # Finish with the reference's step budget: only resumable if stopped before 24.
  if stopped < 24:
    r = run_train(wd, *FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    chex.assert_trees_all_equal(restore_params(wd, 24), restore_params(ref_wd, 24))


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
  wd = str(tmp_path)
  # An infinite learning rate makes the parameters non-finite after the first update.
  r = run_train(wd, *FAST, "--config.learning_rate=inf", "--config.checkpoint_every_steps=1",
                "--config.log_every_steps=5")
  assert r.returncode == 1, r.stdout + r.stderr
  assert "the parameters' norm became nan at step 1; the last good checkpoint (step None)" \
      in r.stderr
  assert checkpoint_steps(wd) == []
  # A finite run that diverges later keeps its earlier, finite checkpoint.
  wd2 = str(tmp_path / "late")
  assert run_train(wd2, *FAST, "--config.num_train_steps=2",
                   "--config.checkpoint_every_steps=1").returncode == 0
  r = run_train(wd2, *FAST, "--config.learning_rate=inf", "--config.checkpoint_every_steps=1")
  assert r.returncode == 1
  assert "became nan at step 3; the last good checkpoint (step 2)" in r.stderr, r.stderr
  assert checkpoint_steps(wd2)[-1] == 2
  params = restore_params(wd2)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))


@pytest.mark.parametrize("args,match", [
    (["--config.no_such_key=1"], "error: unknown config key 'no_such_key' in "
                                 "--config.no_such_key=1"),
    (["--config.model.hidden_size=8"], "unknown config key 'hidden_size' in "
                                       '--config.model.hidden_size=8; Did you mean "hidden_sizes"'),
    (["--config=/no/such/config.py"], "error: "),
    (["--config.log_every_steps=0"], "config.log_every_steps must be an int >= 1, got 0"),
    (["--config.dataset.name=no_such_data"], "no_such_data"),
    (["--config.parallel=spmd"], "config.parallel must be one of"),
    # Fine on 1 device (a whole run; see the device test below).
    pytest.param(["--config.batch_size=30"], None, marks=pytest.mark.slow),
])
def test_bad_flags_give_clear_errors(tmp_path, args, match):
  r = run_train(str(tmp_path), *FAST, "--config.num_train_steps=1", *args)
  if match is None:
    assert r.returncode == 0, r.stderr
    return
  assert r.returncode != 0
  assert match in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_workdir_with_a_different_model_is_refused(reference_run, tmp_path):
  wd = str(tmp_path)
  assert run_train(wd, *FAST, "--config.num_train_steps=8").returncode == 0
  r = run_train(wd, *FAST, "--config.model.hidden_sizes=(8,)")
  assert r.returncode == 1
  assert "different model" in r.stderr


def test_batch_not_divisible_by_devices(tmp_path):
  r = run_train(str(tmp_path), *FAST, "--config.batch_size=30", devices=4)
  assert r.returncode == 1
  assert "config.batch_size=30 must be divisible by the number of devices (4)" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_four_devices_match_one_device(reference_run, tmp_path, parallel):
  """Same global batch and seed on 4 CPU devices: same losses (float reassociation only)."""
  ref_wd, _ = reference_run
  wd = str(tmp_path)
  r = run_train(wd, *FAST, f"--config.parallel={parallel}", devices=4)
  assert r.returncode == 0, r.stdout + r.stderr
  ref = [l["loss"] for l in metrics(ref_wd) if l["split"] == "train"]
  got = [l["loss"] for l in metrics(wd) if l["split"] == "train"]
  np.testing.assert_allclose(got, ref, rtol=2e-4)
  # Evaluation too, batch-norm re-estimation (dropout off) included.
  ref_loss = [l["loss"] for l in metrics(ref_wd) if l["split"] == "validation"]
  got_loss = [l["loss"] for l in metrics(wd) if l["split"] == "validation"]
  np.testing.assert_allclose(got_loss, ref_loss, rtol=2e-4)
  ref_val = [l["accuracy"] for l in metrics(ref_wd) if l["split"] == "validation"]
  got_val = [l["accuracy"] for l in metrics(wd) if l["split"] == "validation"]
  np.testing.assert_allclose(got_val, ref_val, atol=0.02)
