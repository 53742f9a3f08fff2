"""Two processes on localhost through jax.distributed equal one process with two devices."""
import os
import re
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from tests.e2e_util import FAST, JAX_CACHE_ENV, ROOT, metrics, restore_params, run_train


def _launch(workdir, steps, *extra):
  cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "-d", "1", "-w", workdir,
         "--log_dir", os.path.join(workdir, "logs"), "--", *FAST,
         f"--config.num_train_steps={steps}", *extra]
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             GRU_JAX_DATA_DIR=os.environ.get("GRU_JAX_DATA_DIR",
                                             os.path.join(ROOT, ".tfds_test_cache")),
             **JAX_CACHE_ENV)
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  logs = ""
  for i in range(2):
    p = os.path.join(workdir, "logs", f"process_{i}.log")
    if os.path.exists(p):
      logs += open(p).read()[-3000:]
  assert r.returncode == 0, r.stdout + r.stderr + logs
  # Both processes log the loss of every step (one global value): the same numbers.
  logged = [_logged_losses(os.path.join(workdir, "logs", f"process_{i}.log")) for i in range(2)]
  assert logged[0] and int(logged[0][-1][0]) == steps and logged[0] == logged[1]
  return logs


def _logged_losses(path):
  with open(path) as f:
    return re.findall(r"step (\d+)/\d+ epoch \d+ loss (\S+)", f.read())


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices(tmp_path):
  one = str(tmp_path / "one")
  r = run_train(one, *FAST, devices=2)
  assert r.returncode == 0, r.stderr
  two = str(tmp_path / "two")
  _launch(two, 16)            # stop early, then resume in both processes from the checkpoint
  logs = _launch(two, 24)
  assert "Resumed from" in logs
  ref, got = metrics(one), metrics(two)
  assert [(l["step"], l["split"]) for l in got] == [(l["step"], l["split"]) for l in ref]
  np.testing.assert_allclose([l["loss"] for l in got], [l["loss"] for l in ref], rtol=1e-5)
  chex.assert_trees_all_close(restore_params(two), restore_params(one), atol=1e-5)
  # Only process 0 writes logs and metrics.
  assert sorted(os.listdir(two)) == sorted(os.listdir(one) + ["logs"])


@pytest.mark.slow
def test_two_processes_reading_own_shards_equal_one_process_reading_both(tmp_path):
  """config.data_shards=2: each process reads only its half of the training split
  (its own TFDS slice), yet the run, resumed midway, equals one process that
  reads both shards and drives two devices."""
  one = str(tmp_path / "one")
  r = run_train(one, *FAST, "--config.data_shards=2", devices=2)
  assert r.returncode == 0, r.stderr
  assert "process 0 of 1 reads training shards 0-1 of 2 (1258 examples)" in r.stderr
  two = str(tmp_path / "two")
  _launch(two, 16, "--config.data_shards=2")
  logs = _launch(two, 24, "--config.data_shards=2")
  assert "Resumed from" in logs
  for i in range(2):
    own = open(os.path.join(two, "logs", f"process_{i}.log")).read()
    assert f"process {i} of 2 reads training shards {i}-{i} of 2 (629 examples)" in own
  ref, got = metrics(one), metrics(two)
  assert [(l["step"], l["split"]) for l in got] == [(l["step"], l["split"]) for l in ref]
  np.testing.assert_allclose([l["loss"] for l in got], [l["loss"] for l in ref], rtol=1e-5)
  chex.assert_trees_all_close(restore_params(two), restore_params(one), atol=1e-5)
  # Sharded reading changes which rows form a batch, so the run differs from the
  # whole-split default (the data order is part of the experiment's definition).
  whole = str(tmp_path / "whole")
  assert run_train(whole, *FAST, devices=2).returncode == 0
  assert [l["loss"] for l in metrics(whole)][:3] != [l["loss"] for l in ref][:3]


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    # The shell of `salloc -n 4` or of an sbatch script: one process, whatever SLURM_NTASKS says.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4"}, False),
    # A task of `srun -n 4`, as launch/slurm.sbatch starts them.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2",
      "SLURM_STEP_NUM_TASKS": "4"}, True),
    # `srun -n 1` inside a 4-task allocation.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "1", "SLURM_PROCID": "0",
      "SLURM_STEP_NUM_TASKS": "1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
])
def test_auto_initialises_only_in_a_multi_task_srun_step_or_tpu_pod(monkeypatch, env, expected):
  from gru_jax import distributed
  for k in list(os.environ):
    if k.startswith("SLURM_") or k == "TPU_WORKER_HOSTNAMES":
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  distributed.initialize("auto")
  assert calls == ([{}] if expected else [])


@pytest.mark.parametrize("args, message", [
    (dict(mode="yes"), "mode (--distributed) must be one of ('auto', 'on', 'off'), got 'yes'"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0),
     "--coordinator_address must be HOST:PORT (e.g. localhost:1234), got 'localhost'"),
    (dict(coordinator_address="localhost:99999", num_processes=2, process_id=0),
     "got 'localhost:99999'"),
    (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0),
     "--num_processes must be an int >= 1, got 0"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2),
     "--process_id must be an int in [0, 2) (--num_processes=2), got 2"),
    (dict(coordinator_address="localhost:1234", num_processes=2), "must be given together"),
])
def test_bad_arguments_fail_before_jax_is_asked(monkeypatch, args, message):
  # JAX fails on a missing port with an IndexError, and an unknown mode was a silent no-op.
  from gru_jax import distributed
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  with pytest.raises(ValueError) as e:
    distributed.initialize(**args)
  assert message in str(e.value) and calls == []


def test_explicit_arguments_reach_jax(monkeypatch):
  from gru_jax import distributed
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  distributed.initialize("off", "[::1]:1234", 2, 1)  # explicit arguments win over the mode
  distributed.initialize("off")
  assert calls == [dict(coordinator_address="[::1]:1234", num_processes=2, process_id=1)]


def test_on_without_a_cluster_names_the_flags_to_pass():
  # Off a cluster JAX only said "coordinator_address should be defined."
  code = ("from gru_jax import distributed\n"
          "try:\n"
          "  distributed.initialize('on')\n"
          "except ValueError as e:\n"
          "  print(e)\n")
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "JAX_COORDINATOR", "OMPI_", "PMI_"))}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env=dict(env, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr
  assert "could not detect a cluster to join (" in r.stdout  # then JAX's own message
  assert "--coordinator_address, --num_processes and --process_id" in r.stdout


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_and_stops_every_process(tmp_path):
  """A cluster may preempt one host: SIGTERM reaches one process of the run (and when it
  reaches all, not necessarily between the same two steps)."""
  import signal
  from tests.e2e_util import checkpoint_steps
  workdir = str(tmp_path / "run")
  flags = [*FAST, "--config.num_train_steps=5000", "--config.eval_every_steps=1000",
           f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
  procs = [run_train(workdir, *flags, f"--process_id={i}", wait=False) for i in range(2)]
  try:
    deadline = time.time() + 240
    while 8 not in checkpoint_steps(workdir) and time.time() < deadline:
      assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    out1 = procs[1].communicate(timeout=60)[0]
    try:  # the run stops together: seconds, not JAX's heartbeat timeout
      out0 = procs[0].communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
      procs[0].kill()
      out0 = procs[0].communicate()[0] + "\n(killed: still running 20 s after process 1 ended)"
    outs = [out0, out1]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  said = [[l for l in o.splitlines() if re.search(r"SIGTERM|what\(\)|Error|killed", l)][-6:]
          for o in outs]
  # Both stop as preempted, at the same step, and that step's checkpoint is on disk.
  assert [p.returncode for p in procs] == [143, 143], said
  steps = [int(re.search(r"SIGTERM: checkpoint written at step (\d+)", o).group(1))
           for o in outs]
  assert steps[0] == steps[1] == checkpoint_steps(workdir)[-1] > 8, (steps, said)
