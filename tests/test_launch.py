"""Tests of launch/: the dry-run commands of the shell launchers, their process
handling with stand-in trainers, and launch/sweep.py's trial generation, halving
schedule, spec errors, local runs, emitted commands and results table.

Nothing here needs experiments.train: stand-in trainers (tiny Python scripts)
take its place through --entrypoint / --trainer, or fake srun/gcloud on PATH.
"""
import importlib.util
import json
import os
import pathlib
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

_spec = importlib.util.spec_from_file_location("launch_sweep", LAUNCH / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules["launch_sweep"] = sweep  # dataclasses look their module up here
_spec.loader.exec_module(sweep)


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "PYTHON", "TPU_NAME", "ZONE", "PROJECT", "WORKDIR", "CONFIG",
                      "EXTRA_ARGS", "TASKS_PER", "GPUS_PER_NODE", "SRUN_ARGS", "DRY_RUN",
                      "CUDA_VISIBLE_DEVICES", "RETURNCODE_FILE") and not k.startswith("SLURM_")}
  env.update(extra)
  return env


def sh(script, *args, env=None, timeout=60):
  return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, capture_output=True,
                        text=True, env=env or _env(), timeout=timeout)


def lines(proc):
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()


# ----------------------------------------------------------------------------- local.sh

TRAIN = "python -m experiments.train --config=experiments/configs/digits.py"


def test_local_dry_run_exact_commands():
  out = lines(sh("local.sh", "-n", "3", "-d", "2", "-w", "/tmp/w", "--port", "12345", "--dry-run",
                 "--config.batch_size=64", "--", "--note", "a b"))
  assert out == [
      "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 " + TRAIN +
      f" --workdir=/tmp/w --coordinator_address=localhost:12345 --num_processes=3 --process_id={i}"
      " --config.batch_size=64 --note 'a b'" for i in range(3)]
  # The printed lines are real shell: they split back into the intended words.
  assert shlex.split(out[1])[-3:] == ["--config.batch_size=64", "--note", "a b"]


def test_local_dry_run_free_port_gpus_logs_and_existing_xla_flags():
  out = lines(sh("local.sh", "--num_processes=2", "--gpus_per_process=2", "--workdir", "w",
                 "--config", "c.py", "--log_dir", "logs", "--python", "py3", "--dry-run"))
  ports = set()
  for i, line in enumerate(out):
    words = shlex.split(line)
    assert words[0] == f"CUDA_VISIBLE_DEVICES={2 * i},{2 * i + 1}"
    assert words[1:6] == ["py3", "-m", "experiments.train", "--config=c.py", "--workdir=w"]
    assert words[-4:] == [f"--process_id={i}", ">", f"logs/process_{i}.log", "2>&1"]
    address = next(w for w in words if w.startswith("--coordinator_address="))
    host, port = address.split("=", 1)[1].split(":")
    assert host == "localhost" and 1 <= int(port) <= 65535
    ports.add(port)
  assert len(ports) == 1  # every process dials the same coordinator
  out = lines(sh("local.sh", "-n", "1", "-d", "4", "-w", "w", "-p", "9", "--dry-run",
                 env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d")))
  assert shlex.split(out[0])[1] == \
      "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"


@pytest.mark.parametrize("glued", [["-n3", "-d2", "-w/tmp/w", "-p12345", "-cc.py"],
                                   ["-n=3", "-d=2", "-w=/tmp/w", "-p=12345", "-c=c.py"]])
def test_local_short_options_take_a_glued_value(glued):
  # -n3 used to reach the trainer as an unknown flag, with the default 2 processes.
  out = lines(sh("local.sh", *glued, "--dry-run", "--", "-n5"))
  assert out == [
      "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m "
      "experiments.train --config=c.py --workdir=/tmp/w --coordinator_address=localhost:12345 "
      f"--num_processes=3 --process_id={i} -n5" for i in range(3)]
  out = lines(sh("local.sh", "-n1", "-g2", "-ww", "-p9", "--dry-run"))
  assert len(out) == 1 and shlex.split(out[0])[0] == "CUDA_VISIBLE_DEVICES=0,1"


@pytest.mark.parametrize("args, message", [
    (["-n", "0", "-w", "w"], "--num_processes must be a positive integer, got '0'"),
    (["-n", "two", "-w", "w"], "--num_processes must be a positive integer"),
    (["-n0", "-ww"], "--num_processes must be a positive integer, got '0'"),
    (["-dx", "-w=w"], "--cpu_devices must be a positive integer, got 'x'"),
    (["-d", "x", "-w", "w"], "--cpu_devices must be a positive integer, got 'x'"),
    (["-d", "2", "-g", "1", "-w", "w"], "--cpu_devices and --gpus_per_process exclude each other"),
    (["-p", "70000", "-w", "w"], "--port must be in 1..65535, got '70000'"),
    (["-n", "2"], "--workdir is required"),
    (["-w"], "-w needs a value"),
    (["-n", "2", "-w", "--config.x=1"], "-w needs a value"),
    (["-n2", "-w--config.x=1"], "-w needs a value"),
])
def test_local_bad_arguments(args, message):
  proc = sh("local.sh", *args, "--dry-run")
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_local_help():
  proc = sh("local.sh", "-h")
  assert proc.returncode == 0 and "Usage: launch/local.sh" in proc.stdout


FAKE_PROCESS = textwrap.dedent("""\
    import json, os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    i = int(args["process_id"])
    out = os.path.join(args["workdir"], f"p{i}")
    with open(out + ".json", "w") as f:
      json.dump({"argv": sys.argv[1:], "xla": os.environ.get("XLA_FLAGS")}, f)
    if i == int(os.environ.get("FAIL_ID", "-1")):
      sys.exit(7)
    time.sleep(float(os.environ.get("SLEEP", "0")))
    open(out + ".done", "w").close()
""")


def test_local_runs_all_processes(tmp_path):
  (tmp_path / "proc.py").write_text(FAKE_PROCESS)
  proc = sh("local.sh", "-n", "3", "-d", "2", "-w", str(tmp_path), "--entrypoint",
            f"{sys.executable} {tmp_path / 'proc.py'}", "--", "--config.seed=3")
  assert proc.returncode == 0, proc.stderr
  for i in range(3):
    got = json.loads((tmp_path / f"p{i}.json").read_text())
    assert got["xla"] == "--xla_force_host_platform_device_count=2"
    assert got["argv"][-2:] == [f"--process_id={i}", "--config.seed=3"]
    assert (tmp_path / f"p{i}.done").exists()


def test_local_stops_the_others_when_one_fails(tmp_path):
  (tmp_path / "proc.py").write_text(FAKE_PROCESS)
  start = time.time()
  proc = sh("local.sh", "-n", "3", "-w", str(tmp_path), "--log_dir", str(tmp_path / "logs"),
            "--grace", "5", "--entrypoint", f"{sys.executable} {tmp_path / 'proc.py'}",
            env=_env(FAIL_ID="1", SLEEP="60"))
  assert proc.returncode == 7
  assert time.time() - start < 20  # not the 60 s the survivors would sleep
  assert "process 1 exited with status 7" in proc.stderr
  assert not any((tmp_path / f"p{i}.done").exists() for i in range(3))
  assert sorted(os.listdir(tmp_path / "logs")) == [f"process_{i}.log" for i in range(3)]


TERM_RECORDER = textwrap.dedent("""\
    import os, signal, sys, time
    i = [a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1]
    workdir = [a for a in sys.argv if a.startswith("--workdir=")][0].split("=", 1)[1]
    def on_term(signum, frame):  # like the trainer: note the signal, exit 128 + its number
      open(os.path.join(workdir, f"term{i}"), "w").close()
      sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(workdir, f"ready{i}"), "w").close()
    time.sleep(60)
""")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_local_passes_a_signal_on_to_every_process(tmp_path, signum, code):
  # SIGTERM used to exit 130, the status of Ctrl-C.
  (tmp_path / "proc.py").write_text(TERM_RECORDER)
  # SIGINT at its default in the script: a shell cannot trap a signal ignored when it starts,
  # and a test run started in the background (`nohup ... &`, `timeout`) ignores SIGINT.
  proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "-n", "2", "-w", str(tmp_path),
                           "--entrypoint", f"{sys.executable} {tmp_path / 'proc.py'}"],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  deadline = time.time() + 30
  while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == code, err
  assert all((tmp_path / f"term{i}").exists() for i in range(2))  # each got SIGTERM
  assert "stopping all processes" in err


def test_local_joins_a_real_jax_distributed_runtime(tmp_path):
  # What the trainer will do with the flags: 2 processes x 2 CPU devices = 4 global devices.
  (tmp_path / "jaxproc.py").write_text(textwrap.dedent("""\
      import json, os, sys
      a = dict(x[2:].split("=", 1) for x in sys.argv[1:] if x.startswith("--") and "=" in x)
      import jax
      jax.distributed.initialize(a["coordinator_address"], int(a["num_processes"]),
                                 int(a["process_id"]))
      with open(os.path.join(a["workdir"], f"p{a['process_id']}.json"), "w") as f:
        json.dump([jax.device_count(), jax.local_device_count(), jax.process_index()], f)
      jax.distributed.shutdown()
  """))
  proc = sh("local.sh", "-n", "2", "-d", "2", "-w", str(tmp_path), "--entrypoint",
            f"{sys.executable} {tmp_path / 'jaxproc.py'}", timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)] == \
      [[4, 2, 0], [4, 2, 1]]


# ----------------------------------------------------------------------------- slurm.sbatch

SRUN_TRAIN = "python -m experiments.train --config=experiments/configs/digits.py"


def test_slurm_dry_run_one_task_per_gpu():
  env = _env(DRY_RUN="1", SLURM_JOB_ID="42", SLURM_JOB_NAME="exp", SLURM_JOB_NUM_NODES="2",
             SLURM_GPUS_ON_NODE="4", EXTRA_ARGS="--config.seed=1  --config.remat=True")
  assert lines(sh("slurm.sbatch", "--config.batch_size=256", env=env)) == [
      "srun --nodes=2 --ntasks=8 --ntasks-per-node=4 --kill-on-bad-exit=1 " + SRUN_TRAIN +
      " --workdir=runs/exp_42 --config.seed=1 --config.remat=True --config.batch_size=256"]


def test_slurm_dry_run_one_task_per_node():
  env = _env(DRY_RUN="1", SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="4",
             SLURM_CPUS_ON_NODE="32", TASKS_PER="node", CONFIG="experiments/configs/x.py",
             WORKDIR="/shared/r 1", PYTHON="python3", SRUN_ARGS="--mpi=none")
  assert lines(sh("slurm.sbatch", env=env)) == [
      "JAX_LOCAL_DEVICE_IDS=0,1,2,3 srun --nodes=3 --ntasks=3 --ntasks-per-node=1 "
      "--kill-on-bad-exit=1 --cpus-per-task=32 --mpi=none python3 -m experiments.train "
      "--config=experiments/configs/x.py --workdir='/shared/r 1'"]


def test_slurm_dry_run_outside_a_job_and_gpu_count_fallbacks():
  assert lines(sh("slurm.sbatch", env=_env(DRY_RUN="1"))) == [
      "srun --nodes=1 --ntasks=8 --ntasks-per-node=8 --kill-on-bad-exit=1 " + SRUN_TRAIN +
      " --workdir=runs/gru_jax_dryrun"]
  env = _env(DRY_RUN="1", SLURM_JOB_ID="5", CUDA_VISIBLE_DEVICES="0,1")
  assert "--ntasks=2 --ntasks-per-node=2" in lines(sh("slurm.sbatch", env=env))[0]


@pytest.mark.parametrize("env, message", [
    (dict(DRY_RUN="1", TASKS_PER="socket"), "TASKS_PER must be 'gpu' or 'node', got 'socket'"),
    (dict(DRY_RUN="1", GPUS_PER_NODE="0"), "GPUS_PER_NODE must be a positive integer"),
    (dict(DRY_RUN="1", SLURM_JOB_ID="5"), "cannot tell how many GPUs each node has"),
    (dict(), "not inside a SLURM job"),
])
def test_slurm_errors(env, message):
  proc = sh("slurm.sbatch", env=_env(**env))
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _fake_bin(tmp_path, name, rc):
  """A stand-in for srun/gcloud on PATH that records its argv as JSON."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  exe = bindir / name
  exe.write_text(f"#!{sys.executable}\nimport json, sys\n"
                 f"json.dump(sys.argv[1:], open({str(tmp_path / (name + '.json'))!r}, 'w'))\n"
                 f"sys.exit({rc})\n")
  exe.chmod(0o755)
  return f"{bindir}:{os.environ['PATH']}"


def test_slurm_runs_srun_and_records_exit_status(tmp_path):
  env = _env(PATH=_fake_bin(tmp_path, "srun", 5), SLURM_JOB_ID="9", SLURM_JOB_NUM_NODES="1",
             SLURM_GPUS_ON_NODE="2", RETURNCODE_FILE=str(tmp_path / "rc"))
  proc = sh("slurm.sbatch", "--config.seed=2", env=env)
  assert proc.returncode == 5
  assert (tmp_path / "rc").read_text().strip() == "5"
  dry = lines(sh("slurm.sbatch", "--config.seed=2", env={**env, "DRY_RUN": "1"}))[0]
  assert ["srun"] + json.loads((tmp_path / "srun.json").read_text()) == shlex.split(dry)


# ----------------------------------------------------------------------------- tpu_vm.sh

def test_tpu_dry_run_exact_command():
  out = lines(sh("tpu_vm.sh", "-t", "pod", "-z", "us-central2-b", "-w", "gs://b/run",
                 "--dry-run", "--config.batch_size=1024", "--", "--note", "a b"))
  assert out == [
      "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all "
      "--command='cd gru_jax && python3 -m experiments.train "
      "--config=experiments/configs/digits.py --workdir=gs://b/run --distributed=on "
      "--config.batch_size=1024 "
      "--note '\\''a b'\\'''"]
  remote = shlex.split(out[0])[-1].split("=", 1)[1]
  assert shlex.split(remote)[-2:] == ["--note", "a b"]  # survives both shells


def test_tpu_dry_run_from_environment_with_setup_and_flags():
  env = _env(TPU_NAME="v4", ZONE="z1", PROJECT="proj", WORKDIR="gs://b/w")
  out = lines(sh("tpu_vm.sh", "--remote_dir", "~/src/gru jax", "--setup",
                 "source ~/venv/bin/activate", "--gcloud_flag=--internal-ip", "--worker", "0",
                 "--python", "python", "--dry-run", env=env))
  words = shlex.split(out[0])
  assert words[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v4", "--zone=z1",
                       "--project=proj", "--worker=0"]
  assert words[9] == "--internal-ip"
  remote = words[10].split("=", 1)[1]
  assert remote.startswith("cd ~/'src/gru jax' && source ~/venv/bin/activate && python -m")
  assert shlex.split(remote)[-2:] == ["--workdir=gs://b/w", "--distributed=on"]


def test_tpu_errors_and_local_workdir_note(tmp_path):
  proc = sh("tpu_vm.sh", "-z", "z", "-w", "gs://b", "--dry-run")
  assert proc.returncode == 2 and "--tpu (or TPU_NAME) is required" in proc.stderr
  proc = sh("tpu_vm.sh", "-t", "t", "-z", "z", "--dry-run")
  assert proc.returncode == 2 and "--workdir (or WORKDIR) is required" in proc.stderr
  proc = sh("tpu_vm.sh", "-t", "t", "-z", "z", "-w", "/tmp/x", "--dry-run")
  assert proc.returncode == 0 and "use gs://" in proc.stderr


def test_tpu_runs_gcloud(tmp_path):
  env = _env(PATH=_fake_bin(tmp_path, "gcloud", 0))
  args = ["-t", "t", "-z", "z", "-w", "gs://b", "--", "--config.seed=1"]
  assert sh("tpu_vm.sh", *args, env=env).returncode == 0
  dry = lines(sh("tpu_vm.sh", "--dry-run", *args, env=env))[0]
  assert ["gcloud"] + json.loads((tmp_path / "gcloud.json").read_text()) == shlex.split(dry)


# ----------------------------------------------------------------------------- sweep: trials

def parse(argv):
  args, unknown = sweep.make_parser().parse_known_args(["--sweep_dir", "unused"] + argv)
  return sweep.build_sweep(args, unknown)


def overrides(definition):
  return [t["overrides"] for t in definition["trials"]]


def test_grid_is_the_product_with_typed_values():
  d = parse(["--grid", "learning_rate=1e-3,3e-3", "--grid", "model.hidden_size=64,128,256",
             "--grid", "model.cell=gru,lstm", "--grid", "remat=True"])
  got = overrides(d)
  assert len(got) == 12 and len({json.dumps(o, sort_keys=True) for o in got}) == 12
  assert got[0] == {"learning_rate": 0.001, "model.hidden_size": 64, "model.cell": "gru",
                    "remat": True}
  assert [t["name"] for t in d["trials"]][:2] == ["trial_000", "trial_001"]
  assert d["halving"] is None and d["mode"] == "min" and d["metric"] == "validation/loss"


def test_tuple_values_keep_their_inner_commas():
  got = overrides(parse(["--grid", "model.hidden_sizes=(8,),(16, 16),[4]",
                         "--grid", "learning_rate=1e-3,3e-3"]))
  assert [o["model.hidden_sizes"] for o in got[::2]] == [[8], [16, 16], [4]]
  assert sweep.format_value(got[2]["model.hidden_sizes"]) == "(16, 16)"
  assert sweep.split_values('"/data/a,b",\'/c\',(1, 2)') == ['"/data/a,b"', "'/c'", "(1, 2)"]
  assert [sweep.parse_value(v) for v in sweep.split_values('"/data/a,b","/c"')] == \
      ["/data/a,b", "/c"]
  d = parse(["--random", "model.hidden_sizes=choice:(8,),(16,)", "--num_trials", "20"])
  assert {tuple(o["model.hidden_sizes"]) for o in overrides(d)} == {(8,), (16,)}


def test_help_examples_use_real_config_keys():
  """Every KEY in the help text's --grid/--random examples and spec is a digits config key."""
  import re as re_
  from tests.test_configs import load_config
  c = load_config("digits")
  keys = set(re_.findall(r"--(?:grid|random) '?([a-z_.]+)=", sweep.EXAMPLES))
  keys |= set(re_.findall(r'"([a-z_]+\.[a-z_]+|[a-z_]+)": (?:\[|"log)', sweep.EXAMPLES))
  keys -= set(sweep.SPEC_KEYS)  # the spec file's own fields
  assert {"learning_rate", "model.hidden_sizes", "model.dropout", "model.variant"} <= keys
  for key in keys:
    node = c
    for part in key.split("."):
      assert part in node, key
      node = node[part]


def test_random_is_deterministic_and_within_ranges():
  argv = ["--random", "learning_rate=loguniform:1e-4:1e-2", "--random", "dropout=uniform:0:0.5",
          "--random", "layers=int:1:3", "--random", "width=logint:16:256",
          "--random", "cell=choice:gru,lstm", "--num_trials", "200", "--seed", "7"]
  a, b = overrides(parse(argv)), overrides(parse(argv))
  assert a == b and len(a) == 200
  assert a != overrides(parse(argv[:-1] + ["8"]))
  for o in a:
    assert 1e-4 <= o["learning_rate"] <= 1e-2 and 0 <= o["dropout"] <= 0.5
    assert o["layers"] in (1, 2, 3) and 16 <= o["width"] <= 256 and isinstance(o["width"], int)
    assert o["cell"] in ("gru", "lstm")
    assert float(f"{o['learning_rate']:.4g}") == o["learning_rate"]  # 4 significant digits
  assert {o["layers"] for o in a} == {1, 2, 3} and {o["cell"] for o in a} == {"gru", "lstm"}


def test_loguniform_is_uniform_in_log_space():
  rng = random.Random(0)
  log_draws = [sweep.parse_dist("loguniform:1e-4:1e-2", "t").sample(rng) for _ in range(4000)]
  lin_draws = [sweep.parse_dist("uniform:1e-4:1e-2", "t").sample(rng) for _ in range(4000)]
  below = lambda xs: sum(x < 1e-3 for x in xs) / len(xs)
  assert abs(below(log_draws) - 0.5) < 0.04  # 1e-3 is the middle of [1e-4, 1e-2] in log space
  assert below(lin_draws) < 0.12  # ... and 9% of the way along it linearly
  decades = [sum(10 ** (-4 + i / 2) <= x < 10 ** (-4 + (i + 1) / 2) for x in log_draws)
             for i in range(4)]
  assert max(decades) - min(decades) < 200  # each half-decade gets ~1000 of 4000


def test_logint_favours_small_values():
  rng = random.Random(1)
  draws = [sweep.parse_dist("logint:1:1000", "t").sample(rng) for _ in range(3000)]
  assert min(draws) >= 1 and max(draws) <= 1000
  assert abs(sum(d < 32 for d in draws) / 3000 - 0.5) < 0.05  # 32 ~ sqrt(1000)


def test_grid_crossed_with_random_draws():
  got = overrides(parse(["--grid", "seed=0,1,2", "--random", "learning_rate=uniform:0:1",
                         "--num_trials", "4"]))
  assert len(got) == 12
  for draw in range(4):
    group = got[3 * draw:3 * draw + 3]
    assert [o["seed"] for o in group] == [0, 1, 2]
    assert len({o["learning_rate"] for o in group}) == 1  # the same draw for every seed


def test_spec_files_equal_flags(tmp_path):
  spec = {"grid": {"model.hidden_size": [64, 128]},
          "random": {"learning_rate": "loguniform:1e-4:1e-2", "model.cell": ["gru", "lstm"]},
          "fixed": {"num_epochs": 2}, "num_trials": 3, "seed": 4, "metric": "validation/accuracy",
          "halving": {"eta": 2, "min_steps": 10, "max_steps": 40}}
  (tmp_path / "s.json").write_text(json.dumps(spec))
  (tmp_path / "s.py").write_text(f"def get_sweep():\n  return {spec!r}\n")
  from_json, from_py = parse(["--spec", str(tmp_path / "s.json")]), parse(["--spec", str(tmp_path / "s.py")])
  flags = parse(["--grid", "model.hidden_size=64,128", "--random",
                 "learning_rate=loguniform:1e-4:1e-2", "--random", "model.cell=choice:gru,lstm",
                 "--set", "num_epochs=2", "--num_trials", "3", "--seed", "4", "--metric",
                 "validation/accuracy", "--halving", "--eta", "2", "--min_steps", "10",
                 "--max_steps", "40"])
  assert from_json == from_py == flags
  assert flags["mode"] == "max" and flags["halving"]["budgets"] == [10, 20, 40]
  (tmp_path / "t.json").write_text(json.dumps({"trials": [{"a": 1}, {"a": 2, "b": "x"}]}))
  assert overrides(parse(["--spec", str(tmp_path / "t.json")])) == [{"a": 1}, {"a": 2, "b": "x"}]


# ----------------------------------------------------------------------------- sweep: bad specs

@pytest.mark.parametrize("argv, message", [
    (["--grid", "learning_rate"], "--grid 'learning_rate': expected KEY=V1,V2"),
    (["--grid", "=1,2"], "--grid '=1,2': expected KEY=V1,V2"),
    (["--grid", "lr=1,,2"], "--grid 'lr=1,,2': empty value"),
    (["--grid", "model..x=1"], "'model..x' is not a config key"),
    (["--random", "lr=normal:0:1", "--num_trials", "2"], "unknown distribution 'normal:0:1'"),
    (["--random", "lr=loguniform:0:1", "--num_trials", "2"], "needs LOW > 0"),
    (["--random", "lr=uniform:2:1", "--num_trials", "2"], "'uniform:2:1' has LOW > HIGH"),
    (["--random", "lr=uniform:a:b", "--num_trials", "2"], "bounds of 'uniform:a:b' must be numbers"),
    (["--random", "lr=uniform:1", "--num_trials", "2"], "needs exactly two bounds"),
    (["--random", "n=int:1.5:3", "--num_trials", "2"], "bounds of 'int:1.5:3' must be integers"),
    (["--random", "n=logint:0:8", "--num_trials", "2"], "needs LOW >= 1"),
    (["--random", "c=choice:a,,b", "--num_trials", "2"], "has an empty choice"),
    (["--random", "lr=uniform:0:1"], "--num_trials is required with --random"),
    (["--random", "lr=uniform:0:1", "--num_trials", "0"], "--num_trials must be an integer >= 1"),
    (["--grid", "lr=1,2", "--num_trials", "3"], "--num_trials only applies to --random"),
    (["--grid", "lr=1,2", "--random", "lr=uniform:0:1", "--num_trials", "2"],
     "'lr' is already given by --grid 'lr=1,2'"),
    (["--grid", "lr=1,2", "--set", "lr=3"], "'lr' is already given by --grid"),
    (["--seed", "3"], "nothing to sweep"),
    (["--grid", "lr=1,2", "--halving"], "--halving needs --min_steps and --max_steps"),
    (["--grid", "lr=1,2", "--halving", "--min_steps", "10", "--max_steps", "20"],
     "--max_steps (20) must be at least --min_steps * --eta (30)"),
    (["--grid", "lr=1,2", "--halving", "--eta", "1", "--min_steps", "1", "--max_steps", "9"],
     "--eta must be an integer >= 2"),
    (["--grid", "lr=1,2", "--min_steps", "10"], "need --halving"),
    (["--grid", "num_train_steps=10,20", "--halving", "--min_steps", "1", "--max_steps", "9"],
     "successive halving sets num_train_steps itself"),
    (["--grid", "lr=1,2", "--halving", "--min_steps", "1", "--max_steps", "9",
      "--config.num_train_steps=5"], "successive halving sets num_train_steps itself"),
    # absl keeps the last --config.KEY, so a trainer flag would beat every trial's value.
    (["--grid", "lr=1,2", "--config.lr=3"],
     "trainer flag '--config.lr=3' would override 'lr' (given by --grid 'lr=1,2') in every trial"),
    (["--random", "m.p=uniform:0:1", "--num_trials", "2", "--config.m.p=0.5"],
     "trainer flag '--config.m.p=0.5' would override 'm.p' (given by --random"),
    (["--grid", "lr=1,2", "--set", "seed=1", "--config.seed", "2"],
     "trainer flag '--config.seed' would override 'seed' (given by --set 'seed=1')"),
    (["--grid", "lr=1,2", "--metric", "accuracy"], "--metric 'accuracy': expected SPLIT/NAME"),
    (["--grid", "lr=1,2", "--metric", "validation/bleu"], "pass --mode max or --mode min"),
])
def test_bad_specs_name_the_bad_argument(argv, message):
  with pytest.raises(sweep.SpecError) as err:
    parse(argv)
  assert message in str(err.value)


@pytest.mark.parametrize("content, message", [
    ('{"grid": {"a": [1]}, "grdi": {}}', "unknown key(s) ['grdi']"),
    ('{"grid": {"a": 1}}', "grid['a'] must be a non-empty list"),
    ('{"grid": {"a": [1]', "not valid JSON"),
    ('{"trials": [{"a": 1}], "grid": {"b": [1]}}', "drop grid/random"),
    ('{"grid": {"a": [1]}, "halving": {"eta": 3, "rungs": 2}}', "unknown halving key(s) ['rungs']"),
    ('{"random": {"a": 3}, "num_trials": 2}', "expected a string such as"),
])
def test_bad_spec_files(tmp_path, content, message):
  path = tmp_path / "spec.json"
  path.write_text(content)
  with pytest.raises(sweep.SpecError) as err:
    parse(["--spec", str(path)])
  assert message in str(err.value) and str(path) in str(err.value)


def test_bad_spec_file_paths(tmp_path):
  with pytest.raises(sweep.SpecError, match="no such file"):
    parse(["--spec", str(tmp_path / "nope.json")])
  (tmp_path / "s.py").write_text("SWEEP = {}\n")
  with pytest.raises(sweep.SpecError, match="must define get_sweep"):
    parse(["--spec", str(tmp_path / "s.py")])


def test_main_reports_errors_without_a_traceback(tmp_path, capsys):
  d = str(tmp_path / "s")
  assert sweep.main(["--sweep_dir", d, "--grid", "lr"]) == 2
  assert "sweep.py: error: --grid 'lr'" in capsys.readouterr().err
  assert sweep.main(["--sweep_dir", d]) == 2
  assert "holds no sweep" in capsys.readouterr().err
  for argv, message in [(["--grid", "a=1", "--parallel", "0"], "--parallel must be >= 1"),
                        (["--grid", "a=1", "--emit", "slurm", "--trainer", "x"],
                         "--trainer does not apply to --emit slurm"),
                        (["--grid", "a=1,2,3", "--asha", "--min_steps", "1", "--max_steps", "3",
                          "--emit", "shell"], "--asha decides promotions as trials finish")]:
    assert sweep.main(["--sweep_dir", d] + argv) == 2
    assert message in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sweep.main(["--sweep_dir", d, "--gird", "a=1"])
  assert "unrecognized arguments: --gird" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sweep: halving

def test_halving_budgets_and_survivors():
  assert sweep.halving_budgets(100, 2700, 3) == [100, 300, 900, 2700]
  assert sweep.halving_budgets(100, 1000, 3) == [111, 333, 1000]  # scaled down from max
  assert sweep.halving_budgets(10, 40, 2) == [10, 20, 40]
  assert sweep.survivors(27, 4, 3) == [27, 9, 3, 1]
  assert sweep.survivors(8, 4, 3) == [8, 2, 1, 1]


def _simulate(n, rungs, eta, quality, asynchronous=False, workers=1, fail=(), seed=0):
  """Drives next_jobs like a runner with `workers` slots and random finishing order."""
  rng = random.Random(seed)
  scores = [dict() for _ in range(rungs)]
  failed, busy, started = set(), set(), []
  while True:
    for job in sweep.next_jobs(n, scores, failed, busy, eta, asynchronous)[:workers - len(busy)]:
      busy.add(job[0])
      started.append(job)
    if not busy:
      return scores, failed, started
    t = rng.choice(sorted(busy))
    busy.remove(t)
    rung = max(k for tt, k in started if tt == t)
    if t in fail:
      failed.add(t)
    else:
      scores[rung][t] = quality[t]


def test_synchronous_halving_keeps_the_best_third():
  quality = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]  # lower is better: trial 1 best
  scores, failed, started = _simulate(9, 3, 3, quality, workers=4, fail={5})
  assert [len(s) for s in scores] == [8, 3, 1] and failed == {5}
  assert set(scores[1]) == {1, 3, 7} and set(scores[2]) == {1}
  # Rungs never overlap: every rung-1 job starts after the last rung-0 job.
  assert max(i for i, (_, k) in enumerate(started) if k == 0) < \
      min(i for i, (_, k) in enumerate(started) if k == 1)


def test_synchronous_halving_waits_for_a_whole_rung():
  scores = [{0: 1.0, 1: 2.0}, {}]
  assert sweep.next_jobs(3, scores, set(), {2}, 3) == []  # trial 2 still running rung 0
  assert sweep.next_jobs(3, scores, {2}, set(), 3) == [(0, 1)]  # it failed: go on without it
  scores = [{0: None, 1: 2.0, 2: 3.0}, {}]  # a trial without the metric is never promoted
  assert sweep.next_jobs(3, scores, set(), set(), 2) == [(1, 1)]


def test_asha_promotes_early_and_finishes_the_top_rung():
  # After 3 of 9 trials finished rung 0, the best of them is promoted at once.
  scores = [{0: 0.3, 1: 0.2, 2: 0.9}, {}, {}]
  jobs = sweep.next_jobs(9, scores, set(), {3}, 3, asynchronous=True)
  assert jobs[0] == (1, 1) and (4, 0) in jobs and (3, 0) not in jobs
  quality = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]
  for seed in range(5):
    scores, _, started = _simulate(9, 3, 3, quality, asynchronous=True, workers=3, seed=seed)
    assert len(scores[0]) == 9 and 1 in scores[2]  # the best trial gets the full budget
    assert len(started) == len(set(started))  # no job runs twice


# ----------------------------------------------------------------------------- sweep: results

def _write_trial(root, name, records, rc=None):
  (root / name).mkdir(parents=True)
  (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if rc is not None:
    (root / "logs").mkdir(exist_ok=True)
    (root / "logs" / f"{name}.returncode").write_text(f"{rc}\n")


def _fake_sweep(root, halving=None):
  trials = [{"name": f"trial_00{i}", "overrides": {"learning_rate": lr}}
            for i, lr in enumerate([0.1, 0.01, 0.001, 0.0001, 0.03])]
  definition = {"config": "c.py", "workdir_root": str(root), "trials": trials, "fixed": {},
                "extra_args": [], "halving": halving, "metric": "validation/accuracy",
                "mode": "max", "spec": {}}
  root.mkdir(parents=True, exist_ok=True)
  (root / "sweep.json").write_text(json.dumps(definition))
  return definition


def _records(step, acc, loss):
  return [{"step": step // 2, "split": "train", "loss": 2.0},
          {"step": step // 2, "split": "validation", "accuracy": acc / 2, "loss": 9.0},
          {"step": step, "split": "train", "loss": 1.0},
          {"step": step, "split": "validation", "accuracy": acc},
          {"step": step, "split": "validation", "loss": loss},
          {"step": step, "split": "test", "accuracy": 0.0}]


def test_results_table_sorted_with_failures_marked(tmp_path, capsys):
  root = tmp_path / "s"
  _fake_sweep(root)
  _write_trial(root, "trial_000", _records(100, 0.80, 0.5), rc=0)
  _write_trial(root, "trial_001", _records(100, 0.95, 0.2), rc=0)
  _write_trial(root, "trial_002", _records(40, 0.99, 0.1)[:2], rc=1)  # crashed part-way
  _write_trial(root, "trial_003", _records(100, float("nan"), 0.9), rc=0)
  (root / "trial_003" / "metrics.jsonl").open("a").write('{"step": 10')  # a torn last line
  (root / "logs" / "trial_002.log").write_text("step 1\nValueError: boom\n")
  # trial_004 never ran: no workdir, no return code.
  assert sweep.main(["--sweep_dir", str(root), "--report"]) == 0
  out = capsys.readouterr().out
  table = out[out.index("rank"):].splitlines()
  assert table[0].split() == ["rank", "trial", "status", "steps", "learning_rate",
                              "validation/accuracy", "validation/loss"]
  assert [l.split()[:3] for l in table[1:6]] == [
      ["1", "trial_001", "ok"], ["2", "trial_000", "ok"], ["-", "trial_002", "failed"],
      ["-", "trial_003", "ok"], ["-", "trial_004", "pending"]]
  assert "failed (rc=1)" in table[3] and "nan" in table[4]
  assert "trial_002 failed: ValueError: boom" in out
  assert "best: trial_001 validation/accuracy=0.95  --config.learning_rate=0.01" in out
  res = json.loads((root / "results.json").read_text())
  assert [r["trial"] for r in res["trials"]][:2] == ["trial_001", "trial_000"]
  assert res["trials"][0]["metrics"] == {"train/loss": 1.0, "validation/accuracy": 0.95,
                                         "validation/loss": 0.2, "test/accuracy": 0.0}
  csv_lines = (root / "results.csv").read_text().splitlines()
  assert csv_lines[0] == ("rank,trial,status,returncode,steps,learning_rate,test/accuracy,"
                          "train/loss,validation/accuracy,validation/loss")
  assert csv_lines[1].startswith("1,trial_001,ok,0,100,0.01,0.0,1.0,0.95,0.2")
  assert csv_lines[3].startswith(",trial_002,failed,1,20,0.001")
  # The same sweep ranked by another metric, lower being better.
  assert sweep.main(["--sweep_dir", str(root), "--report", "--metric", "validation/loss"]) == 0
  out = capsys.readouterr().out
  assert [l.split()[1] for l in out[out.index("rank"):].splitlines()[1:4]] == \
      ["trial_001", "trial_000", "trial_003"]


def test_results_under_halving_rank_longer_budgets_first(tmp_path, capsys):
  root = tmp_path / "s"
  _fake_sweep(root, halving={"eta": 3, "min_steps": 10, "max_steps": 30, "asynchronous": False,
                             "budgets": [10, 30]})
  # trial_000 was best at 10 steps, went on to 30 and fell below trial_002's 10-step score.
  _write_trial(root, "trial_000", _records(10, 0.95, 0.5) + _records(30, 0.7, 0.5)[2:], rc=0)
  for i, acc in [(1, 0.6), (2, 0.9), (3, 0.5), (4, 0.4)]:
    _write_trial(root, f"trial_00{i}", _records(10, acc, 0.5), rc=0)
  sweep.main(["--sweep_dir", str(root), "--report"])
  out = capsys.readouterr().out
  rows = [l.split() for l in out[out.index("rank"):].splitlines()[1:6]]
  assert [r[1] for r in rows] == ["trial_000", "trial_002", "trial_001", "trial_003", "trial_004"]
  assert [r[2] for r in rows] == ["ok"] + ["stopped"] * 4


def test_missing_metric_is_reported(tmp_path, capsys):
  root = tmp_path / "s"
  _fake_sweep(root)
  _write_trial(root, "trial_000", [{"step": 5, "split": "validation", "rmse": 1.0}], rc=0)
  sweep.main(["--sweep_dir", str(root), "--report"])
  assert ("validation/accuracy is missing from 1 finished trial(s) (trial_000); metrics found: "
          "validation/rmse") in capsys.readouterr().out


# ----------------------------------------------------------------------------- sweep: running

FAKE_TRAINER = textwrap.dedent("""\
    # Stands in for experiments.train: accuracy peaks at learning_rate 3e-3 and grows with
    # steps; resumes from the last step in metrics.jsonl, like a checkpoint restore.
    import json, math, os, signal, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    wd = args["workdir"]
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "calls.jsonl"), "a") as f:
      f.write(json.dumps(sys.argv[1:]) + "\\n")
    if args.get("config.fail") == "True":
      print("ValueError: this trial is broken", file=sys.stderr)
      sys.exit(3)
    def on_term(*_):
      open(os.path.join(wd, "terminated"), "w").close()
      sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    time.sleep(float(args.get("config.sleep", "0")))
    lr = float(args.get("config.learning_rate", "0.01"))
    steps = int(args.get("config.num_train_steps", "20"))
    path = os.path.join(wd, "metrics.jsonl")
    start = 0
    if os.path.exists(path):
      start = max(json.loads(l)["step"] for l in open(path) if l.strip())
    with open(path, "a") as f:
      for s in range(start + 1, steps + 1):
        if s % 5 == 0 or s == steps:
          acc = 1 - abs(math.log10(lr) + 2.5) / 10 - 1 / s
          f.write(json.dumps({"step": s, "split": "validation", "accuracy": acc}) + "\\n")
    time.sleep(float(args.get("config.linger", "0")))  # like writing the final checkpoint
""")


@pytest.fixture
def trainer(tmp_path):
  path = tmp_path / "fake_trainer.py"
  path.write_text(FAKE_TRAINER)
  return f"{sys.executable} {path}"


def _calls(workdir):
  path = pathlib.Path(workdir) / "calls.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_local_grid_runs_in_parallel_and_survives_failures(tmp_path, trainer, capsys,
                                                           monkeypatch):
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  d = tmp_path / "s"
  argv = ["--sweep_dir", str(d), "--grid", "learning_rate=1e-4,3e-3,1e-1", "--grid",
          "fail=False,True", "--parallel", "3", "--gpus_per_trial", "1", "--metric",
          "validation/accuracy", "--trainer", trainer, "--config.num_epochs=1", "--", "--flag=x"]
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  table = out[out.index("rank"):].splitlines()
  assert [l.split()[1:3] for l in table[1:4]] == [["trial_002", "ok"], ["trial_000", "ok"],
                                                  ["trial_004", "ok"]]
  assert all("failed (rc=3)" in l for l in table[4:7])
  assert "trial_001 failed: ValueError: this trial is broken" in out
  assert _calls(d / "trial_002") == [[
      "--config=experiments/configs/digits.py", f"--workdir={d / 'trial_002'}",
      "--config.learning_rate=0.003", "--config.fail=False", "--config.num_epochs=1",
      "--flag=x"]]
  log = (d / "logs" / "trial_002.log").read_text()
  assert log.startswith("# ") and "CUDA_VISIBLE_DEVICES=" in log
  assert (d / "logs" / "trial_001.returncode").read_text() == "3\n"
  # Rerunning, with the same flags or with none, starts nothing and prints the same table.
  assert sweep.main(argv) == 0
  assert sweep.main(["--sweep_dir", str(d)]) == 0
  assert "start" not in capsys.readouterr().out
  assert all(len(_calls(d / f"trial_00{i}")) == 1 for i in range(6))
  # --retry_failed runs the failed ones again (and they fail again).
  assert sweep.main(["--sweep_dir", str(d), "--retry_failed", "--trainer", trainer]) == 0
  assert [len(_calls(d / f"trial_00{i}")) for i in range(6)] == [1, 2, 1, 2, 1, 2]
  # A different sweep in the same directory is refused.
  assert sweep.main(["--sweep_dir", str(d), "--grid", "learning_rate=1,2"]) == 2
  assert "already holds a different sweep (its trials" in capsys.readouterr().err


def test_all_trials_failing_exits_non_zero(tmp_path, trainer, capsys):
  assert sweep.main(["--sweep_dir", str(tmp_path / "s"), "--grid", "fail=True",
                     "--trainer", trainer]) == 1
  assert sweep.main(["--sweep_dir", str(tmp_path / "t"), "--grid", "a=1,2",
                     "--trainer", str(tmp_path / "no_such_trainer")]) == 1
  out = capsys.readouterr().out
  assert out.count("failed (rc=127)") == 2 and "trial_001 failed: cannot start" in out


@pytest.mark.parametrize("asynchronous", [False, True])
def test_local_halving_resumes_survivors_in_their_workdirs(tmp_path, trainer, capsys,
                                                           asynchronous):
  d = tmp_path / "s"
  lrs = ",".join(str(x) for x in [1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 1e-1, 1.0, 3e-5, 3e-4])
  argv = ["--sweep_dir", str(d), "--grid", f"learning_rate={lrs}", "--halving" if not asynchronous
          else "--asha", "--min_steps", "5", "--max_steps", "45", "--metric",
          "validation/accuracy", "--parallel", "4", "--trainer", trainer, "--",
          f"--config.linger={0 if asynchronous else 0.4}"]
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  # The stand-ins linger after writing their last metrics, as the trainer does while writing
  # its final checkpoint; with 4 slots the 9th trial lingers alone while 3 slots are free.
  # A rung must start only once every process of the rung before has exited.
  if not asynchronous:
    events = [l for l in out.splitlines() if l.startswith("[")]
    last_done = max(i for i, l in enumerate(events) if " done " in l and "rung 1/3" in l)
    first_next = min(i for i, l in enumerate(events) if " start " in l and "rung 2/3" in l)
    assert last_done < first_next
  assert "9 x 5 -> 3 x 15 -> 1 x 45 steps" in out
  budgets = {i: [int(a.split("=")[1]) for call in _calls(d / f"trial_00{i}") for a in call
                 if a.startswith("--config.num_train_steps=")] for i in range(9)}
  assert budgets[3] == [5, 15, 45]  # learning_rate 3e-3, the best, goes all the way
  assert all(b[0] == 5 for b in budgets.values())
  if not asynchronous:
    assert sorted(len(b) for b in budgets.values()) == [1] * 6 + [2] * 2 + [3]
    assert {i for i, b in budgets.items() if len(b) >= 2} == {2, 3, 4}
  # Survivors continued where they stopped: one metrics record per 5 steps, none repeated.
  steps = [json.loads(l)["step"]
           for l in (d / "trial_003" / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(5, 50, 5))
  table = out[out.index("rank"):].splitlines()
  assert table[1].split()[1:4] == ["trial_003", "ok", "45"]
  assert [l.split()[2] for l in table[2:]].count("stopped") == 8


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  d = tmp_path / "s"
  assert sweep.main(["--sweep_dir", str(d), "--grid", "learning_rate=1e-3,3e-3",
                     "--parallel", "2", "--gpus_per_trial", "2", "--dry-run", "--",
                     "--config.num_epochs=1"]) == 0
  out = capsys.readouterr()
  assert out.out.splitlines() == [
      f"mkdir -p {d}/logs",
      f"CUDA_VISIBLE_DEVICES=0,1 {sys.executable} -m experiments.train "
      f"--config=experiments/configs/digits.py --workdir={d}/trial_000 "
      f"--config.learning_rate=0.001 --config.num_epochs=1 >> {d}/logs/trial_000.log 2>&1",
      f"CUDA_VISIBLE_DEVICES=2,3 {sys.executable} -m experiments.train "
      f"--config=experiments/configs/digits.py --workdir={d}/trial_001 "
      f"--config.learning_rate=0.003 --config.num_epochs=1 >> {d}/logs/trial_001.log 2>&1"]
  assert "2 trials of experiments/configs/digits.py" in out.err
  assert not d.exists()


def test_emit_slurm_and_tpu_lines(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  d = tmp_path / "sw"
  common = ["--sweep_dir", str(d), "--grid", "learning_rate=1e-3,3e-3", "--halving",
            "--min_steps", "10", "--max_steps", "30", "--dry-run"]
  assert sweep.main(common + ["--emit", "slurm", "--sbatch_flags=--gpus-per-node=1 --time=60"]) == 0
  assert capsys.readouterr().out.splitlines()[:2] == [f"mkdir -p {d}/logs", (
      f"CONFIG=experiments/configs/digits.py WORKDIR={d}/trial_000 "
      f"RETURNCODE_FILE={d}/logs/trial_000.returncode sbatch --job-name=sw-trial_000 "
      f"--output={d}/logs/trial_000.log --open-mode=append --gpus-per-node=1 --time=60 "
      "launch/slurm.sbatch --config.learning_rate=0.001 --config.num_train_steps=10")]
  assert sweep.main(common + ["--emit", "tpu"]) == 0
  assert capsys.readouterr().out.splitlines()[2] == (
      f"launch/tpu_vm.sh --config=experiments/configs/digits.py --workdir={d}/trial_001 -- "
      f"--config.learning_rate=0.003 --config.num_train_steps=10 >> {d}/logs/trial_001.log "
      f"2>&1; echo $? > {d}/logs/trial_001.returncode")


def test_emit_shell_runs_a_halving_sweep_rung_by_rung(tmp_path, trainer, capsys):
  d = tmp_path / "s"
  argv = ["--sweep_dir", str(d), "--grid", "learning_rate=1e-4,1e-3,3e-3,1e-2,1e-1,1.0",
          "--halving", "--eta", "2", "--min_steps", "5", "--max_steps", "20", "--metric",
          "validation/accuracy", "--emit", "shell", "--trainer", trainer]

  def emit():
    assert sweep.main(argv) == 0
    out = capsys.readouterr()
    return out.out.splitlines(), out.err

  rung0, err = emit()
  assert len(rung0) == 6 and "6 x 5 -> 3 x 10 -> 1 x 20" in err
  assert rung0[0] == (f"{trainer} --config=experiments/configs/digits.py "
                      f"--workdir={d}/trial_000 --config.learning_rate=0.0001 "
                      f"--config.num_train_steps=5 >> {d}/logs/trial_000.log 2>&1; "
                      f"echo $? > {d}/logs/trial_000.returncode")
  again, err = emit()  # nothing has run yet: nothing is emitted twice
  assert again == [] and "6 job(s) emitted earlier have not finished" in err
  for line in rung0:
    subprocess.run(line, shell=True, executable="/bin/bash", check=True)
  rung1, _ = emit()
  # 1e-3 and 1e-2 tie with each other, 3e-3 is best: the top half of 6.
  assert sorted(l.split("--workdir=")[1].split()[0][-9:] for l in rung1) == \
      ["trial_001", "trial_002", "trial_003"]
  assert all("--config.num_train_steps=10" in l for l in rung1)
  for line in rung1:
    subprocess.run(line, shell=True, executable="/bin/bash", check=True)
  rung2, _ = emit()
  assert len(rung2) == 1 and "trial_002" in rung2[0] and "num_train_steps=20" in rung2[0]
  subprocess.run(rung2[0], shell=True, executable="/bin/bash", check=True)
  done, err = emit()
  assert done == [] and "best: trial_002" in err
  assert json.loads((d / "results.json").read_text())["trials"][0]["steps"] == 20


# Runs argv[1:] with SIGINT/SIGHUP/SIGTERM at their defaults. The suite may run with them
# ignored (under nohup, or as a background job), which a child inherits and sweep.py rightly
# keeps; these tests are about how it reacts to them. (A preexec_fn would fork a threaded
# JAX process; SIG_DFL survives exec.)
DEFAULT_SIGNALS = [sys.executable, "-c",
                   "import os, signal, sys\n"
                   "for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):\n"
                   "  signal.signal(s, signal.SIG_DFL)\n"
                   "os.execv(sys.argv[1], sys.argv[1:])"]


def test_interrupted_sweep_stops_trials_without_failing_them(tmp_path, trainer):
  d = tmp_path / "s"
  argv = [sys.executable, str(LAUNCH / "sweep.py"), "--sweep_dir", str(d), "--grid",
          "learning_rate=1e-3,3e-3", "--parallel", "2", "--trainer", trainer]
  proc = subprocess.Popen(DEFAULT_SIGNALS + argv + ["--", "--config.sleep=30"],
                          stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 20
  while time.time() < deadline and not all((d / f"trial_00{i}" / "calls.jsonl").exists()
                                           for i in range(2)):
    time.sleep(0.05)
  time.sleep(0.3)  # let the stand-ins install their SIGTERM handler
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 130 and "interrupted" in out
  assert all((d / f"trial_00{i}" / "terminated").exists() for i in range(2))
  assert not list((d / "logs").glob("*.returncode"))  # not failed: to be resumed
  assert "pending" in out


# ----------------------------------------------------------------------------- sweep: safety

def test_trainer_flag_overriding_a_trial_key_is_refused(tmp_path, capsys):
  (tmp_path / "t.json").write_text(json.dumps({"trials": [{"a": 1}, {"a": 2}]}))
  with pytest.raises(sweep.SpecError, match=r"trainer flag '--config.a=3' would override 'a' "
                     r"\(given by --spec '.*t.json' trials\)"):
    parse(["--spec", str(tmp_path / "t.json"), "--config.a=3"])
  # Through main, flags after -- too; nothing is created.
  d = tmp_path / "s"
  assert sweep.main(["--sweep_dir", str(d), "--grid", "learning_rate=1e-3,3e-3", "--",
                     "--config.learning_rate=1e-2"]) == 2
  assert "would override 'learning_rate'" in capsys.readouterr().err and not d.exists()
  assert overrides(parse(["--grid", "lr=1,2", "--config.lr_decay=3"])) == [{"lr": 1}, {"lr": 2}]


def test_two_sweeps_cannot_share_a_trial_workdir(tmp_path, trainer, capsys, monkeypatch):
  root = tmp_path / "shared"
  common = ["--workdir_root", str(root), "--metric", "validation/accuracy", "--trainer", trainer]
  a = ["--sweep_dir", str(tmp_path / "a"), "--grid", "learning_rate=3e-3"] + common
  assert sweep.main(a) == 0
  mark = json.loads((root / "trial_000" / sweep.MARKER).read_text())
  assert mark == {"sweep_dir": str((tmp_path / "a").resolve()), "trial": "trial_000",
                  "overrides": {"learning_rate": 0.003}}
  capsys.readouterr()
  # Another sweep would resume sweep a's run as its own trial_000: refused before it starts.
  b = ["--sweep_dir", str(tmp_path / "b"), "--grid", "learning_rate=1e-5"] + common
  for extra in ([], ["--dry-run"]):
    assert sweep.main(b + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (
        f"trial workdir '{root / 'trial_000'}' already holds a run of the sweep in "
        f"{(tmp_path / 'a').resolve()}; use another --workdir_root") in err
  assert not (tmp_path / "b").exists() and len(_calls(root / "trial_000")) == 1
  # The same sweep resumes as before, also through another path to its directory.
  assert sweep.main(a) == 0
  os.symlink(tmp_path / "a", tmp_path / "link")
  assert sweep.main(["--sweep_dir", str(tmp_path / "link")]) == 0
  assert "start" not in capsys.readouterr().out and len(_calls(root / "trial_000")) == 1
  # A new sweep in the same --sweep_dir (sweep.json removed) with other overrides is refused.
  (tmp_path / "a" / "sweep.json").unlink()
  assert sweep.main(["--sweep_dir", str(tmp_path / "a"), "--grid", "learning_rate=1e-1"]
                    + common) == 2
  assert "with other overrides ({\"learning_rate\": 0.003})" in capsys.readouterr().err
  # Remote workdirs cannot be looked into from here: neither checked nor marked.
  monkeypatch.chdir(tmp_path)
  remote = sweep.Sweep(parse(["--grid", "learning_rate=1e-5", "--workdir_root", "gs://b/x"]), "c")
  remote.check_workdirs()
  remote.start_job(0, 0)
  assert (tmp_path / "c" / "jobs.json").exists() and not (tmp_path / "gs:").exists()


def _trial_pids(tmp_path, n, timeout=20):
  deadline = time.time() + timeout
  paths = [tmp_path / "s" / f"trial_00{i}" / "pid" for i in range(n)]
  while time.time() < deadline and not all(p.exists() and p.read_text() for p in paths):
    time.sleep(0.05)
  time.sleep(0.3)  # let the stand-ins install their SIGTERM handlers
  return [int(p.read_text()) for p in paths]


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


STUBBORN_TRAINER = textwrap.dedent("""\
    # Like a trainer stuck in a long compile: it notes SIGTERM (or not, with --ignore_term) and
    # goes on sleeping.
    import os, signal, sys, time
    wd = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
    os.makedirs(wd, exist_ok=True)
    def on_term(*_):
      open(os.path.join(wd, "terminated"), "w").close()
      if "--ignore_term" not in sys.argv:
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    with open(os.path.join(wd, "pid"), "w") as f:
      f.write(str(os.getpid()))
    time.sleep(60)
""")


def test_hangup_stops_trials_and_a_second_driver_is_refused(tmp_path):
  (tmp_path / "stub.py").write_text(STUBBORN_TRAINER)
  d = tmp_path / "s"
  argv = [sys.executable, str(LAUNCH / "sweep.py"), "--sweep_dir", str(d), "--grid",
          "learning_rate=1e-3,3e-3", "--parallel", "2", "--trainer",
          f"{sys.executable} {tmp_path / 'stub.py'}"]
  proc = subprocess.Popen(DEFAULT_SIGNALS + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  pids = _trial_pids(tmp_path, 2)
  # A second driver on the same sweep_dir would start a second trainer in each workdir.
  second = subprocess.run(argv, capture_output=True, text=True, timeout=30)
  assert second.returncode == 2
  assert second.stderr == (f"sweep.py: error: --sweep_dir '{d}' is in use by another sweep.py "
                           f"(pid {proc.pid}); wait for it to end or stop it\n")
  proc.send_signal(signal.SIGHUP)  # the terminal was closed
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 130 and "interrupted" in out and "Traceback" not in err
  assert all((d / f"trial_00{i}" / "terminated").exists() for i in range(2))
  assert not any(_alive(pid) for pid in pids)
  assert "no best trial yet: no trial has finished" in out
  # The lock went with the driver: the next run may take it.
  import fcntl
  with open(d / ".lock") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_second_interrupt_kills_the_trials_and_exits_cleanly(tmp_path):
  (tmp_path / "stub.py").write_text(STUBBORN_TRAINER)
  d = tmp_path / "s"
  argv = [sys.executable, str(LAUNCH / "sweep.py"), "--sweep_dir", str(d), "--grid",
          "learning_rate=1e-3,3e-3", "--parallel", "2", "--trainer",
          f"{sys.executable} {tmp_path / 'stub.py'}", "--", "--ignore_term"]
  proc = subprocess.Popen(DEFAULT_SIGNALS + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  pids = _trial_pids(tmp_path, 2)
  start = time.time()
  proc.send_signal(signal.SIGTERM)
  deadline = time.time() + 10
  while time.time() < deadline and not all((d / f"trial_00{i}" / "terminated").exists()
                                           for i in range(2)):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)  # impatient: do not wait the 60 s grace period
  out, err = proc.communicate(timeout=30)
  assert time.time() - start < 15
  assert proc.returncode == 130 and "Traceback" not in err, err
  assert "interrupted again: killed 2 trial(s)" in out
  assert not any(_alive(pid) for pid in pids)
  table = out[out.index("\nrank") + 1:].splitlines()
  assert [l.split()[1:3] for l in table[1:3]] == [["trial_000", "pending"],
                                                   ["trial_001", "pending"]]
  assert not list((d / "logs").glob("*.returncode"))  # to be resumed, not failed


def test_unfinished_trials_rank_after_finished_ones(tmp_path, capsys):
  root = tmp_path / "s"
  _fake_sweep(root)
  _write_trial(root, "trial_000", _records(100, 0.80, 0.5), rc=0)
  _write_trial(root, "trial_001", _records(40, 0.99, 0.1))  # interrupted, better so far
  _write_trial(root, "trial_002", _records(100, 0.85, 0.5), rc=0)
  assert sweep.main(["--sweep_dir", str(root), "--report"]) == 0
  out = capsys.readouterr().out
  table = out[out.index("\nrank") + 1:].splitlines()
  assert [l.split()[:3] for l in table[1:4]] == [
      ["1", "trial_002", "ok"], ["2", "trial_000", "ok"], ["-", "trial_001", "pending"]]
  assert "best: trial_002 validation/accuracy=0.85  --config.learning_rate=0.001" in out
  res = json.loads((root / "results.json").read_text())
  assert [(r["trial"], r["rank"]) for r in res["trials"][:3]] == \
      [("trial_002", 1), ("trial_000", 2), ("trial_001", None)]
  # Nothing finished: no best, and it says so.
  root = tmp_path / "t"
  _fake_sweep(root)
  _write_trial(root, "trial_000", _records(40, 0.99, 0.1))
  assert sweep.main(["--sweep_dir", str(root), "--report"]) == 0
  out = capsys.readouterr().out
  assert "best:" not in out and "no best trial yet: no trial has finished" in out
  assert all(r["rank"] is None for r in json.loads((root / "results.json").read_text())["trials"])


def test_best_line_is_shell_quoted(tmp_path, trainer, capsys):
  d = tmp_path / "s"
  assert sweep.main(["--sweep_dir", str(d), "--grid", "model.hidden_sizes=(64, 64)",
                     "--trainer", trainer, "--metric", "validation/accuracy"]) == 0
  best = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("best:"))
  assert shlex.split(best)[-1] == "--config.model.hidden_sizes=(64, 64)"


def test_gpus_are_handed_out_from_cuda_visible_devices(tmp_path, trainer, capsys, monkeypatch):
  d = tmp_path / "s"
  argv = ["--sweep_dir", str(d), "--grid", "learning_rate=1e-3,3e-3", "--parallel", "2",
          "--trainer", trainer]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
  assert sweep.main(argv + ["--gpus_per_trial", "2", "--dry-run"]) == 0
  assert [l.split()[0] for l in capsys.readouterr().out.splitlines()[1:]] == \
      ["CUDA_VISIBLE_DEVICES=4,5", "CUDA_VISIBLE_DEVICES=6,7"]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,GPU-5")
  assert sweep.main(argv + ["--gpus_per_trial", "2"]) == 2
  assert ("--parallel 2 x --gpus_per_trial 2 needs 4 GPUs, but CUDA_VISIBLE_DEVICES='7,GPU-5' "
          "lists 2") in capsys.readouterr().err and not d.exists()
  assert sweep.main(argv + ["--gpus_per_trial", "1"]) == 0
  assert "start trial_000 on GPU 7:" in capsys.readouterr().out
  for i, gpu in enumerate(["7", "GPU-5"]):
    header = (d / "logs" / f"trial_00{i}.log").read_text().splitlines()[0]
    assert f": CUDA_VISIBLE_DEVICES={gpu} " in header


def test_local_gpus_come_from_cuda_visible_devices(tmp_path):
  out = lines(sh("local.sh", "-n", "2", "-g", "2", "-w", "w", "-p", "9", "--dry-run",
                 env=_env(CUDA_VISIBLE_DEVICES="4,5,6,7")))
  assert [l.split()[0] for l in out] == ["CUDA_VISIBLE_DEVICES=4,5", "CUDA_VISIBLE_DEVICES=6,7"]
  proc = sh("local.sh", "-n", "2", "-g", "2", "-w", "w", "-p", "9", "--dry-run",
            env=_env(CUDA_VISIBLE_DEVICES="4,5"))
  assert proc.returncode == 2 and ("2 processes x 2 GPUs need 4 GPUs, but "
                                   "CUDA_VISIBLE_DEVICES='4,5' lists 2") in proc.stderr


def test_local_numbers_with_leading_zeros(tmp_path):
  # Bash arithmetic reads 08 as octal: --grace 08 broke stopping the others after a failure.
  (tmp_path / "proc.py").write_text(FAKE_PROCESS)
  proc = sh("local.sh", "-n", "03", "-w", str(tmp_path), "--grace", "08", "--entrypoint",
            f"{sys.executable} {tmp_path / 'proc.py'}", env=_env(FAIL_ID="1", SLEEP="60"))
  assert proc.returncode == 7 and "process 1 exited with status 7" in proc.stderr
  assert "value too great" not in proc.stderr and "error" not in proc.stderr


def test_tpu_python_under_home_is_expanded_on_the_worker(tmp_path):
  home = tmp_path / "home"
  (home / "venv" / "bin").mkdir(parents=True)
  (home / "gru_jax").mkdir()
  py = home / "venv" / "bin" / "python3"
  py.write_text('#!/bin/sh\necho "trainer: $*"\n')
  py.chmod(0o755)
  out = lines(sh("tpu_vm.sh", "-t", "t", "-z", "z", "-w", "gs://b/r", "--remote_dir", "~/gru_jax",
                 "--python", "~/venv/bin/python3", "--dry-run"))
  remote = shlex.split(out[0])[-1].split("=", 1)[1]
  assert remote.startswith("cd ~/gru_jax && ~/venv/bin/python3 -m experiments.train")
  # What the worker's shell does with it.
  ran = subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(home)),
                       capture_output=True, text=True)
  assert ran.returncode == 0 and ran.stdout.startswith("trainer: -m experiments.train"), ran.stderr


def test_default_config_from_another_directory(tmp_path, capsys, monkeypatch):
  assert parse(["--grid", "a=1"])["config"] == "experiments/configs/digits.py"  # from the root
  monkeypatch.chdir(tmp_path)
  assert parse(["--grid", "a=1"])["config"] == str(REPO / "experiments" / "configs" / "digits.py")
  # The workers of --emit tpu read it from their REMOTE_DIR.
  assert parse(["--grid", "a=1", "--emit", "tpu"])["config"] == "experiments/configs/digits.py"
  assert sweep.main(["--sweep_dir", "s", "--grid", "a=1", "--dry-run"]) == 0
  assert f"--config={REPO}/experiments/configs/digits.py" in capsys.readouterr().out
  # A missing config fails once, up front, not in every trial.
  assert sweep.main(["--sweep_dir", "s", "--grid", "a=1", "--config", "nope.py"]) == 2
  assert f"--config 'nope.py': no such file (relative to {tmp_path})" in capsys.readouterr().err
  assert not (tmp_path / "s").exists()
  assert sweep.main(["--sweep_dir", "s", "--grid", "a=1", "--config", "nope.py", "--emit", "tpu",
                     "--dry-run"]) == 0
  # The same command again from the repository root: still the same sweep (the default config).
  monkeypatch.chdir(REPO)
  assert sweep.main(["--sweep_dir", str(tmp_path / "s2"), "--grid", "a=1", "--emit", "shell"]) == 0
  monkeypatch.chdir(tmp_path)
  assert sweep.main(["--sweep_dir", str(tmp_path / "s2"), "--grid", "a=1", "--emit", "shell",
                     "--resubmit"]) == 0
  assert "already holds a different sweep" not in capsys.readouterr().err


def test_small_spec_and_directory_errors(tmp_path, capsys):
  (tmp_path / "m.json").write_text('{"grid": {"a": [1]}, "metric": 5}')
  with pytest.raises(sweep.SpecError, match="--metric must be a string SPLIT/NAME .* got 5"):
    parse(["--spec", str(tmp_path / "m.json")])
  # NumPy values from a Python spec become plain Python values ...
  (tmp_path / "np.py").write_text(
      "import numpy as np\n"
      "def get_sweep():\n"
      "  return {'grid': {'model.embed_dim': list(np.arange(16, 49, 16)),\n"
      "                   'model.dropout': [np.float32(0.5)]}, 'seed': np.int64(3)}\n")
  d = parse(["--spec", str(tmp_path / "np.py")])
  assert overrides(d) == [{"model.embed_dim": e, "model.dropout": 0.5} for e in (16, 32, 48)]
  assert all(type(o["model.embed_dim"]) is int for o in overrides(d))
  assert sweep.format_value(overrides(d)[0]["model.embed_dim"]) == "16"
  # ... and other values are refused before anything is written.
  (tmp_path / "obj.py").write_text("def get_sweep():\n  return {'grid': {'a': [object()]}}\n")
  s = tmp_path / "s"
  assert sweep.main(["--sweep_dir", str(s), "--spec", str(tmp_path / "obj.py")]) == 2
  assert "is not JSON serializable; use plain values" in capsys.readouterr().err
  assert not s.exists()
  (tmp_path / "afile").write_text("")
  assert sweep.main(["--sweep_dir", str(tmp_path / "afile" / "s"), "--grid", "a=1"]) == 2
  assert capsys.readouterr().err == (f"sweep.py: error: --sweep_dir '{tmp_path}/afile/s': cannot "
                                     "create it (Not a directory)\n")


def test_dry_run_output_runs_as_a_script(tmp_path, trainer, capsys):
  d = tmp_path / "s"
  assert sweep.main(["--sweep_dir", str(d), "--grid", "learning_rate=1e-3,3e-3",
                     "--trainer", trainer, "--dry-run"]) == 0
  script = capsys.readouterr().out
  assert script.startswith(f"mkdir -p {d}/logs\n")
  subprocess.run(["bash", "-e", "-c", script], check=True, timeout=60)
  assert [len(_calls(d / f"trial_00{i}")) for i in range(2)] == [1, 1]
  assert (d / "logs" / "trial_001.log").exists()
