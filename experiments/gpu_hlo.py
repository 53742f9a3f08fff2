r"""Compiles gru_jax for an NVIDIA GPU without one, and counts each loop step's kernels.

  pip install jax-cuda12-plugin==$(python -c 'import jax; print(jax.__version__)')
  python -m experiments.gpu_hlo --shapes=128x500x1024x1024 --mode=train \
      --impls=gru_jax/xla/reset_after,gru_jax/xla/reset_after/packed

XLA compiles for a described device with no GPU present (deviceless AOT:
`jax.experimental.topologies.get_topology_desc` with a target config); only
the CUDA plugin is needed, not the NVIDIA libraries or a driver.  gru_jax
chooses its GPU paths at trace time from `jax.default_backend()`, which is
made to say "gpu" while tracing.  No autotuning runs without a device, so
the GEMM configurations (Triton tiles, split-K) are XLA's defaults, not what
a real device picks; the fusion structure, and so the number of kernels each
loop iteration launches, is what this measures.  At the large shapes of
issue 5 a step of the "xla" backend is one matmul and a few small kernels,
and the per-step time measured on an H200 (18-19 µs at forward
256x200x512x512) is far above the matmul's, so each launch counts.

For each implementation, shape and mode, prints every while loop's trip count
and the kernels of one iteration (fusions, GEMMs, copies, custom calls), and
writes the optimised HLO and a JSON summary to --out_dir.

The Pallas kernels loop inside one launch each, so for them it reports what
that launch needs from the chip instead: grid, threads and shared memory (from
XLA's thunk sequence, which it dumps to a temporary folder), and, with
--ptxas pointing at NVIDIA's PTX assembler (`pip download nvidia-cuda-nvcc-cu12`,
unzip; its bin/ptxas), the registers a thread uses and the bytes it spills to
local memory (`ptxas -v` on the kernel's PTX for sm_90a).  XLA itself refuses
at compile time a kernel whose shared memory exceeds the card's 227 KB.  While
tracing, the SM count the column split checks is the target's (132).  Implementation
names are experiments/benchmark.py's gru_jax ones (its options included);
--impls defaults to the "xla" backend with and without packed stores, and
--out_dir to runs/gpu_hlo.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

from absl import app, flags

from experiments import benchmark  # defines --shapes, --mode, --impls, --out_dir, used here

flags.DEFINE_enum("device", "h100", ["h100", "h200"], "The GPU to compile for.")
flags.DEFINE_string("target_config", None, "A GpuTargetConfig text proto; overrides --device.")
flags.DEFINE_string("ptxas", None, "NVIDIA's ptxas, to report the Pallas kernels' registers and "
                    "spills; without it only their grid, threads and shared memory.")
FLAGS = flags.FLAGS
DEFAULT_IMPLS = ["gru_jax/xla/reset_after", "gru_jax/xla/reset_after/packed"]

# Published specifications (NVIDIA's data sheets, CUDA's device attributes for
# compute capability 9.0); XLA reads them for its fusion and tiling decisions.
_HOPPER = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
               shared_memory_per_core=233472, shared_memory_per_block_optin=232448,
               threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
               block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535,
               l2_cache_size=52428800, clock_rate_ghz=1.98, registers_per_core_limit=65536,
               registers_per_block_limit=65536)
DEVICES = {
    "h100": ("NVIDIA H100 80GB HBM3", dict(_HOPPER, memory_bandwidth=3352320000000,
                                            device_memory_size=84929347584)),
    "h200": ("NVIDIA H200", dict(_HOPPER, memory_bandwidth=4800000000000,
                                 device_memory_size=150754820096)),
}

# Instructions that launch nothing on the device.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "opt-barrier", "partition-id", "replica-id"}


def target_config(device: str) -> str:
  """A GpuTargetConfig text proto for one of `DEVICES`."""
  name, info = DEVICES[device]
  fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
  return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 }}\n}}\n"
          f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 7 }}\n'
          f"runtime_version {{ major: 12 minor: 8 }}\n"
          f'device_description_str: "{name}"\n')


def _op(line: str) -> tuple[str, str] | None:
  """(name, opcode) of an HLO instruction line, or None."""
  m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):  # a tuple type: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(" ", 1)[1] if " " in rest else ""
  op = re.match(r"\s*([\w\-]+)\(", rest)
  return (m.group(1), op.group(1)) if op else None


def computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines, from optimised HLO text."""
  comps, cur = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and " = " not in line:
      cur = head.group(1)
      comps[cur] = []
    elif cur is not None and line.strip() not in ("", "}"):
      comps[cur].append(line)
  return comps


def loop_kernels(hlo: str) -> list[dict]:
  """Every while loop: its body, trip count (None if unknown) and one iteration's kernels.

  A kernel is any instruction of the body that launches device work (a
  fusion, a GEMM custom call, a copy, ...), named "opcode:name", custom calls
  "custom-call[target]:name"; a nested while is listed as "while:name" and
  reported as a loop of its own.
  """
  comps = computations(hlo)
  loops = []
  for lines in comps.values():
    for line in lines:
      parsed = _op(line)
      if not parsed or parsed[1] != "while":
        continue
      body = re.search(r"body=%?([\w.\-]+)", line).group(1)
      trip = re.search(r'known_trip_count"?:\{"n":"(\d+)"', line)
      kernels = []
      for inst in comps.get(body, []):
        p = _op(inst)
        if p and p[1] not in _FREE:
          target = re.search(r'custom_call_target="([^"]+)"', inst)
          kernels.append(f"{p[1]}[{target.group(1)}]:{p[0]}" if target else f"{p[1]}:{p[0]}")
      loops.append(dict(body=body, trip_count=int(trip.group(1)) if trip else None,
                        kernels=kernels))
  return loops


_THUNK = re.compile(r"\] (\w+_kernel) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+"
                    r"shared_memory: (\d+) bytes")


def pallas_kernels(thunk_sequence: str) -> list[dict]:
  """Each Pallas kernel launch in XLA's thunk sequence dump: name, grid, threads and
  shared memory (bytes).  gru_jax's kernel functions are named *_kernel."""
  return [dict(name=m.group(1), grid=[int(v) for v in m.group(2).split(",")],
               threads=int(m.group(3).split(",")[0]), shared_memory=int(m.group(4)))
          for m in _THUNK.finditer(thunk_sequence)]


def ptxas_resources(report: str) -> dict:
  """Registers a thread and spill bytes, from ``ptxas -v``'s report on one kernel."""
  regs = re.search(r"Used (\d+) registers", report)
  spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
  if not regs or not spill:
    raise ValueError(f"no register report in ptxas's output: {report[-300:]!r}")
  return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)),
              spill_loads=int(spill.group(2)))


def _kernel_resources(dump_dir: str, files: list[str], ptxas: str | None) -> list[dict]:
  """`pallas_kernels` of one compile's dump files, with `ptxas_resources` if ``ptxas``."""
  import subprocess
  seq = [f for f in files if f.endswith("thunk_sequence.txt")]
  if not seq:
    return []
  with open(os.path.join(dump_dir, seq[0])) as f:
    kernels = pallas_kernels(f.read())
  ptx = {}
  for name in (f for f in files if f.endswith(".ptx")):
    with open(os.path.join(dump_dir, name)) as f:
      text = f.read()
    for k in kernels:
      if f".entry {k['name']}(" in text:
        ptx[k["name"]] = os.path.join(dump_dir, name)
  for k in kernels:
    if ptxas and k["name"] in ptx:
      out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx[k["name"]], "-o", os.devnull],
                           capture_output=True, text=True, check=True)
      k.update(ptxas_resources(out.stderr + out.stdout))
  return kernels


def describe_kernel(k: dict) -> str:
  regs = (f", {k['registers']} registers, spills {k['spill_stores']} / {k['spill_loads']} B"
          if "registers" in k else "")
  return (f"{k['name']}: grid {'x'.join(map(str, k['grid']))}, {k['threads']} threads, "
          f"{k['shared_memory'] // 1024} KB shared{regs}")


@contextlib.contextmanager
def _traced_as_gpu(sm_count: int):
  """Makes gru_jax pick its GPU paths while tracing on a CPU-only machine, with the
  target's SM count for the column split's residency check."""
  import jax
  from gru_jax.kernels import pallas_gru
  saved = jax.default_backend, pallas_gru._sm_count
  jax.default_backend = lambda: "gpu"
  pallas_gru._sm_count = lambda: sm_count
  try:
    yield
  finally:
    jax.default_backend, pallas_gru._sm_count = saved


def compile_text(impl: str, shape, mode: str, config: str, dtype: str = "float32") -> str:
  """The optimised HLO of one gru_jax step compiled for the described GPU.

  ``dtype`` is the matmul dtype, as the benchmark's --dtype (the state stays float32).
  """
  sm = re.search(r"core_count: (\d+)", config)
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                      topology="1x1x1")
  mesh = topologies.make_mesh(topo, (1,), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)
  b, t, d, h = shape
  with _traced_as_gpu(int(sm.group(1)) if sm else 0):
    apply, params = benchmark.gru_jax_apply(
        impl, shape, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    args = [jax.tree.map(spec, params), spec(jax.ShapeDtypeStruct((b, t, d), jnp.float32))]
    if mode == "train":
      args.append(spec(jax.ShapeDtypeStruct((b, t, h), jnp.float32)))
      fn = jax.grad(lambda p, x, ct: jnp.sum(apply(p, x) * ct), argnums=(0, 1))
    else:
      fn = apply
    return jax.jit(fn).lower(*args).compile().as_text()


def summary(loops: list[dict]) -> str:
  if not loops:  # the Pallas kernels loop inside one custom call each
    return "no while loops"
  return "; ".join(f"{lp['trip_count'] or '?'} × {len(lp['kernels'])} kernels" for lp in loops)


def main(argv):
  del argv
  import tempfile
  # XLA reads its flags once, when the first backend starts: before anything below.
  dump_dir = tempfile.mkdtemp(prefix="gpu_hlo_dump_")
  user_flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{user_flags} --xla_dump_to={dump_dir}".strip()
  import jax
  jax.config.update("jax_platforms", "cpu")  # compile only: no GPU is looked for
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
  except ImportError:
    raise app.UsageError("needs the CUDA plugin: pip install "
                         f"jax-cuda12-plugin=={jax.__version__} (no NVIDIA libraries)") from None
  config = open(FLAGS.target_config).read() if FLAGS.target_config else target_config(
      FLAGS.device)
  impls = DEFAULT_IMPLS if FLAGS.impls == ["all"] else FLAGS.impls
  others = [i for i in impls if not (i == benchmark.REFERENCE or i.startswith("gru_jax/"))]
  if others:
    raise app.UsageError(f"--impls: only gru_jax implementations compile here, got {others}")
  out_dir = FLAGS.out_dir if FLAGS["out_dir"].present else "runs/gpu_hlo"
  os.makedirs(out_dir, exist_ok=True)
  modes = ["train", "forward"] if FLAGS.mode == "both" else [FLAGS.mode]
  if FLAGS.ptxas and not os.access(FLAGS.ptxas, os.X_OK):
    raise app.UsageError(f"--ptxas={FLAGS.ptxas} is not an executable file")
  out = dict(device=FLAGS.target_config or FLAGS.device, jax=jax.__version__, dtype=FLAGS.dtype,
             xla_flags=user_flags, results=[])
  for mode in modes:
    for text in FLAGS.shapes:
      shape = benchmark.parse_shape(text)
      for impl in impls:
        before = set(os.listdir(dump_dir))
        hlo = compile_text(impl, shape, mode, config, FLAGS.dtype)
        stem = f"{mode}_{text}_{impl.replace('/', '_')}"
        with open(os.path.join(out_dir, stem + ".hlo"), "w") as f:
          f.write(hlo)
        loops = loop_kernels(hlo)
        kernels = _kernel_resources(dump_dir, sorted(set(os.listdir(dump_dir)) - before),
                                    FLAGS.ptxas)
        out["results"].append(dict(mode=mode, shape=list(shape), impl=impl, loops=loops,
                                   pallas_kernels=kernels))
        print(f"{mode} {text} {impl}: {summary(loops)}")
        for lp in loops:
          print(f"  {lp['trip_count'] or '?'} × [{', '.join(lp['kernels'])}]")
        for k in kernels:
          print(f"  {describe_kernel(k)}")
  with open(os.path.join(out_dir, "gpu_hlo.json"), "w") as f:
    json.dump(out, f, indent=1)
  shutil.rmtree(dump_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
