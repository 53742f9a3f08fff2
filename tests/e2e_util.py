"""Runs the real entrypoint in a subprocess (fresh JAX runtime, real signals)."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, fast variant of the default digits run.
FAST = ["--config.model.hidden_sizes=(16,16)", "--config.num_train_steps=24",
        "--config.eval_every_steps=8", "--config.checkpoint_every_steps=8",
        "--config.log_every_steps=1", "--config.bn_recalibrate_batches=2",
        "--config.batch_size=32",
        # A constant learning rate: digits' warmup (50 steps) is longer than these runs (refused),
        # and a cosine decay would make a run stopped early and resumed with another
        # num_train_steps follow another schedule.
        "--config.optimizer.schedule=constant"]
# JAX's own persistent compilation cache, shared by every test and training
# subprocess: a FAST run spends about 10 of its 20 s compiling the same train and
# eval steps.  No size limit: a limit turns on LRU eviction, which rereads every
# entry on each write.  Without its lock, a torn read by a concurrent writer fails
# decompression, and JAX warns and recompiles.
_CACHE_DIR = os.environ.get("GRU_JAX_TEST_JAX_CACHE", os.path.join(ROOT, ".jax_test_cache"))
JAX_CACHE_ENV = {} if _CACHE_DIR == "off" else {
    "JAX_COMPILATION_CACHE_DIR": _CACHE_DIR,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}


def run_train(workdir, *overrides, config="experiments/configs/digits.py", devices=1,
              extra_env=None, timeout=300, wait=True):
  cmd = [sys.executable, "-m", "experiments.train", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             GRU_JAX_DATA_DIR=os.environ.get("GRU_JAX_DATA_DIR",
                                             os.path.join(ROOT, ".tfds_test_cache")),
             **JAX_CACHE_ENV)
  env.update(extra_env or {})
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def restore_params(workdir, step=None):
  import orbax.checkpoint as ocp
  step = step if step is not None else checkpoint_steps(workdir)[-1]
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "default")
  import jax
  ckptr = ocp.StandardCheckpointer()
  # Onto this process's device, whatever topology (e.g. 2 processes) saved it.
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                          ckptr.metadata(path).item_metadata.tree)
  return ckptr.restore(path, abstract)


def signal_after_a_checkpoint(workdir, signum, *overrides):
  """A long FAST run, sent ``signum`` once it has written a checkpoint: (returncode, output)."""
  proc = run_train(workdir, *FAST, "--config.num_train_steps=2000", *overrides, wait=False)
  deadline = time.time() + 240
  while not checkpoint_steps(workdir) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out
