r"""Times one GRU layer in gru_jax and its peers, in one process, interleaved.

  python -m experiments.benchmark --shapes=64x100x128x128,64x100x512x512,16x500x64x256 \
      --mode=train --out_dir=runs/bench

Shapes are BxTxDxH.  "train" is forward + backward of sum(outputs · a fixed
random cotangent) w.r.t. the parameters and the inputs; "forward" returns the
outputs.  Every implementation is built and warmed up first, then timed in
rounds (one call of each per round, so machine load hits all alike; the
order rotates every round), each
call synchronised (`block_until_ready`, `torch.cuda.synchronize`) and
preceded by an untimed ``--gap_ms`` pause and one untimed call of the same
implementation, so each timed call is a steady-state, back-to-back step as
in a training loop.  Without them, on a small CPU the previous call's thread
pool (XLA's or torch's OpenMP) still spins, and its freed buffers have been
returned to the OS so the next call page-faults its own back in: back to
back on 2 cores, torch's train step measured 1.4 s instead of 32 ms, and the
JAX implementation timed after torch 10-20 ms slow.
Reported: median ms per step over the rounds (and the 25th/75th percentiles),
tokens/s = B·T / median, and the ratio median / median of "gru_jax" (the
default backend, reset_after form: the form every peer but Haiku computes).

Implementations (``--impls``, default all that are installed and apply):
  gru_jax/<backend>/<variant>  backend "xla", "pallas" (GPU only; interpret
                               mode elsewhere is not a speed), "scan"; options
                               may follow: /loop or /scan (how an undifferentiated
                               "xla" call runs), /chunks=N (time chunks of a
                               differentiated CPU call; 1 = unchunked),
                               /resets=P (segment resets at a fraction P of
                               the steps, drawn once: the cost of `resets=`),
                               /zoneout=P (zoneout weights [B,T,H], Bernoulli(P),
                               drawn once: the cost of `zoneout_mask=`),
                               /unroll=N (`gru_jax.gru`'s unroll: steps per
                               loop iteration of the "xla" and "scan" loops),
                               /packed (the "xla" loops store one packed row
                               per step: `fused_rnn.PACKED`)
  flax      nn.RNN(nn.GRUCell)           equinox  eqx.nn.GRUCell + lax.scan
  haiku     hk.GRU + hk.dynamic_unroll   keras    keras.layers.GRU, JAX backend, stateless_call
  torch     torch.nn.GRU (cuDNN on GPU; on CPU ATen's generic RNN loop, per-step matmuls
            and pointwise ops differentiated by autograd: no oneDNN RNN primitive)
With --dtype=bfloat16 each runs in its own bf16 mode, so the rows compare
different numerics: gru_jax takes float32 x and cotangent with
compute_dtype=bfloat16 (bf16 operands in the input projection and the per-step
matmuls; float32 gates, state and outputs; under AD on the "xla" backend the
weight-gradient and dx matmuls after the loop run in float32); Flax bf16 matmuls
and gates, float32 params and state (its carry has param_dtype); Equinox, Haiku,
Keras (float32-initialised weights, cast, in a "bfloat16" layer: "mixed_bfloat16"
fails in Keras 3.15) and torch: everything in bf16.

Every implementation computes the same function (Haiku the "seed" form) and, for
"train", the gradients w.r.t. all its parameters and x: tests/test_benchmark.py
checks each step's outputs and gradients against a float64 reference.

Writes <out_dir>/benchmark.json (per implementation: median_ms, p25_ms, p75_ms,
runs, tokens_per_s, ratio_to_gru_jax, and for gru_jax's the backend that ran as
"path") and benchmark.png (tokens/s against T and for every shape, one line per
implementation) and prints a table.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras

from absl import app, flags

flags.DEFINE_list("shapes", ["64x100x128x128"], "Comma-separated BxTxDxH shapes.")
flags.DEFINE_enum("mode", "train", ["train", "forward", "both"], "What one step is.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Matmul / parameter dtype.")
flags.DEFINE_list("impls", ["all"], "Implementations to time (see the module docstring); "
                  "'all' = every one installed that applies on this device.")
flags.DEFINE_integer("repeats", 30, "Timed rounds (one call of each implementation per round).",
                     lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed calls of each implementation after compiling.",
                     lower_bound=0)
flags.DEFINE_float("gap_ms", 10.0, "Idle pause before each timed call (not timed).",
                   lower_bound=0.0)
flags.DEFINE_string("out_dir", "runs/benchmark", "Where benchmark.json and benchmark.png go.")
FLAGS = flags.FLAGS

REFERENCE = "gru_jax"  # the default backend, reset_after form
PEERS = ("flax", "equinox", "haiku", "keras", "torch")


def parse_shape(text: str) -> tuple[int, int, int, int]:
  try:
    b, t, d, h = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--shapes entries must be BxTxDxH, got {text!r}") from None
  return b, t, d, h


def default_impls(platform_name: str) -> list[str]:
  """gru_jax's paths that apply here (Pallas only on GPU), then every peer."""
  backends = ["xla", "scan"] + (["pallas"] if platform_name == "gpu" else [])
  return ([REFERENCE] + [f"gru_jax/{b}/{v}" for b in backends for v in ("reset_after", "seed")]
          + list(PEERS))


# ---------------------------------------------------------------- implementations
# Each builder returns a step: step() runs one synchronised call (what is timed).
# For checks (tests/test_benchmark.py), step.result() runs the same call and returns
# what it computes, unsynchronised (forward: the outputs [B,T,H]; train: the gradients
# (parameters, inputs)), and step.native holds what it runs on: params (as
# differentiated), x, ct, the module (Equinox: its static part) where a converter needs
# it, and for gru_jax the backend it runs (path).

def _step(run, sync, result=None, **native):
  step = lambda: sync(run())
  step.result, step.native = result or run, native
  return step


def _jax_step(loss_or_fn, params, x, mode, **native):
  import jax
  if mode == "train":
    fn = jax.jit(jax.grad(loss_or_fn, argnums=(0, 1)))
  else:
    fn = jax.jit(loss_or_fn)
  return _step(lambda: fn(params, x), jax.block_until_ready, params=params, x=x, **native)


def _fraction(text: str) -> float | None:
  """text as a float in [0, 1], else None."""
  try:
    value = float(text)
  except ValueError:
    return None
  return value if 0.0 <= value <= 1.0 else None


def _inputs(shape, dtype):
  import jax
  b, t, d, h = shape
  k = jax.random.key(0)
  x = jax.random.normal(k, (b, t, d), dtype)
  ct = jax.random.normal(jax.random.fold_in(k, 1), (b, t, h), dtype)
  return x, ct


def gru_jax_apply(impl: str, shape, act):
  """(apply(params, x) -> outputs [B,T,H], params) for a gru_jax implementation name.

  gru_jax/<backend>/<variant>[/<option>...]: "loop" or "scan" forces how an
  undifferentiated "xla" call runs, "chunks=N" how many time chunks a
  differentiated CPU call runs in, "packed" the packed stores of the "xla"
  loops, "split=N" the Pallas kernels' column split (`pallas_gru.SPLIT`; all
  read while tracing, inside apply).
  """
  import contextlib
  import jax
  import jax.numpy as jnp
  import gru_jax
  from gru_jax.kernels import fused_rnn, pallas_gru
  b, t, d, h = shape
  parts = ["auto", "reset_after"] if impl == REFERENCE else impl.split("/")[1:]
  if len(parts) < 2:
    raise ValueError(f"{impl!r}: gru_jax implementations are gru_jax/<backend>/<variant>"
                     "[/<option>...], e.g. gru_jax/xla/seed")
  backend, variant, *opts = parts
  settings = {(fused_rnn, "PRIMAL"): None, (gru_jax.scan, "CPU_CHUNKS"): None,
              (fused_rnn, "PACKED"): None, (pallas_gru, "SPLIT"): None}
  resets, zoneout, unroll = None, None, 1
  for opt in opts:
    if opt in ("loop", "scan"):
      settings[fused_rnn, "PRIMAL"] = opt
    elif opt == "packed":
      settings[fused_rnn, "PACKED"] = True
    elif opt.startswith("chunks=") and opt[7:].isdigit() and int(opt[7:]) >= 1:
      settings[gru_jax.scan, "CPU_CHUNKS"] = int(opt[7:])
    elif opt.startswith("resets=") and _fraction(opt[7:]) is not None:
      resets = jax.random.bernoulli(jax.random.key(7), _fraction(opt[7:]), (b, t))
    elif opt.startswith("zoneout=") and _fraction(opt[8:]) is not None:
      zoneout = jax.random.bernoulli(jax.random.key(8), _fraction(opt[8:]),
                                     (b, t, h)).astype(jnp.float32)
    elif opt.startswith("unroll=") and opt[7:].isdigit() and int(opt[7:]) >= 1:
      unroll = int(opt[7:])
    elif opt.startswith("split=") and opt[6:].isdigit():
      settings[pallas_gru, "SPLIT"] = int(opt[6:])
    else:
      raise ValueError(f"unknown option {opt!r} in {impl!r}: expected loop, scan, packed, "
                       "chunks=N, resets=P or zoneout=P (0 <= P <= 1), unroll=N (N >= 1) "
                       "or split=N")
  params = gru_jax.cell.init(jax.random.key(42), d, h)

  @contextlib.contextmanager
  def configured():
    saved = {k: getattr(*k) for k in settings}
    for (mod, name), value in settings.items():
      setattr(mod, name, value)
    try:
      yield
    finally:
      for (mod, name), value in saved.items():
        setattr(mod, name, value)

  with configured():
    path = gru_jax.scan.resolve_backend(backend, hidden_size=h, batch=b, compute_dtype=act,
                                        state_dtype=jnp.float32, variant=variant,
                                        resets=resets is not None,
                                        zoneout=zoneout is not None)
  if backend == "pallas" and path != "pallas":  # it falls back to "xla" silently: not pallas
    raise ValueError(f"{impl!r}: the Pallas kernels do not apply at B={b}, H={h} "
                     f"({jnp.dtype(act).name}); gru_jax would run {path!r}")

  def apply(p, x):
    with configured():
      return gru_jax.gru(p, x, variant=variant, backend=backend, compute_dtype=act,
                         resets=resets, unroll=unroll, zoneout_mask=zoneout)[1]
  apply.path = path  # the backend it runs ("auto" resolved), recorded in the results
  return apply, params


def build(impl: str, shape, mode: str, dtype_name: str):
  """A zero-argument step for ``impl`` on ``shape``; raises if it does not apply."""
  import jax
  import jax.numpy as jnp
  b, t, d, h = shape
  bf16 = dtype_name == "bfloat16"
  act = jnp.bfloat16 if bf16 else jnp.float32
  key = jax.random.key(42)

  def finish(apply, params, x, ct, **native):
    loss = lambda p, x: jnp.sum(apply(p, x).astype(jnp.float32) * ct)
    return _jax_step(loss if mode == "train" else apply, params, x, mode, ct=ct, **native)

  if impl == REFERENCE or impl.startswith("gru_jax/"):
    apply, params = gru_jax_apply(impl, shape, act)
    x, ct = _inputs(shape, jnp.float32)
    return finish(apply, params, x, ct, path=apply.path)

  if impl == "flax":
    import flax.linen as nn
    x, ct = _inputs(shape, act)
    rnn = nn.RNN(nn.GRUCell(h, dtype=act, param_dtype=jnp.float32))
    return finish(rnn.apply, rnn.init(key, x), x, ct, module=rnn)

  if impl == "equinox":
    import equinox as eqx
    x, ct = _inputs(shape, act)
    cell = eqx.nn.GRUCell(d, h, key=key)
    params, static = eqx.partition(cell, eqx.is_array)
    params = jax.tree.map(lambda a: a.astype(act), params)

    def apply(p, x):
      c = eqx.combine(p, static)
      step = lambda hs, xt: (jax.vmap(c)(xt, hs),) * 2
      return jnp.swapaxes(jax.lax.scan(step, jnp.zeros((b, h), act), jnp.swapaxes(x, 0, 1))[1],
                          0, 1)
    return finish(apply, params, x, ct, static=static)

  if impl == "haiku":
    import haiku as hk
    x, ct = _inputs(shape, act)

    def fwd(x):
      core = hk.GRU(h)
      hs, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(b).astype(act))
      return jnp.swapaxes(hs, 0, 1)
    model = hk.without_apply_rng(hk.transform(fwd))
    params = jax.tree.map(lambda a: a.astype(act), model.init(key, x))
    return finish(model.apply, params, x, ct)

  if impl == "keras":
    import keras
    if keras.backend.backend() != "jax":
      raise RuntimeError(f"keras uses the {keras.backend.backend()} backend, not jax")
    x, ct = _inputs(shape, act)
    # Keras' default initialisers, seeded (unseeded, every call drew other weights).
    init = dict(kernel_initializer=keras.initializers.GlorotUniform(seed=42),
                recurrent_initializer=keras.initializers.Orthogonal(seed=43))
    layer = keras.layers.GRU(h, return_sequences=True, dtype="float32", **init)
    layer.build((b, t, d))
    trainable = [v.value.astype(act) for v in layer.trainable_variables]
    if bf16:
      # Keras 3.15's JAX GRU fails with "mixed_bfloat16" (its scan carry changes dtype),
      # and "bfloat16" cannot run the orthogonal initialiser (no bf16 QR): so the float32
      # weights, cast, run in a "bfloat16" layer (everything bf16, as Equinox and Haiku).
      layer = keras.layers.GRU(h, return_sequences=True, dtype="bfloat16",
                               recurrent_initializer="zeros")
      layer.build((b, t, d))
    fixed = [v.value for v in layer.non_trainable_variables]
    apply = lambda p, x: layer.stateless_call(p, fixed, x)[0]
    return finish(apply, trainable, x, ct, module=layer)

  if impl == "torch":
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    gru = torch.nn.GRU(d, h, batch_first=True).to(dev, tdt)
    gru.flatten_parameters()  # after a dtype cast cuDNN otherwise re-packs the weights every call
    xt = torch.randn(b, t, d, device=dev, dtype=tdt, requires_grad=mode == "train")
    ctt = torch.randn(b, t, h, device=dev, dtype=tdt)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run():
      if mode == "train":
        for p in gru.parameters():
          p.grad = None
        xt.grad = None
        out, _ = gru(xt)
        (out * ctt).sum().backward()
        return None
      with torch.no_grad():
        return gru(xt)[0]

    def result():  # the gradients are read after the call, outside what is timed
      out = run()
      return out if mode != "train" else ({n: p.grad for n, p in gru.named_parameters()},
                                          xt.grad)
    return _step(run, lambda _: sync(), result, params=dict(gru.named_parameters()), x=xt,
                 ct=ctt, module=gru)

  raise ValueError(f"unknown implementation {impl!r}; see --helpfull")


# ---------------------------------------------------------------- timing

def time_interleaved(steps: dict, repeats: int, warmup: int, gap_s: float = 0.01) -> dict:
  """{name: [seconds per call]}: after warm-up, ``repeats`` rounds of one call each."""
  for step in steps.values():
    for _ in range(warmup):
      step()
  times = {name: [] for name in steps}
  names = list(steps)
  for i in range(repeats):
    # Each round starts one implementation later, so none always runs first.
    for name in names[i % len(names):] + names[:i % len(names)]:
      step = steps[name]
      time.sleep(gap_s)
      step()  # untimed: the previous implementation's frees and idle threads are its problem
      t0 = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - t0)
  return times


def summarise(seconds: list, shape) -> dict:
  import numpy as np
  s = np.asarray(seconds)
  b, t = shape[:2]
  med = float(np.median(s))
  return dict(median_ms=1e3 * med, p25_ms=1e3 * float(np.percentile(s, 25)),
              p75_ms=1e3 * float(np.percentile(s, 75)), runs=len(s), tokens_per_s=b * t / med)


def machine_info() -> dict:
  import jax
  info = dict(jax_platform=jax.default_backend(), jax_device=str(jax.devices()[0].device_kind),
              cpu_count=os.cpu_count(), python=platform.python_version(),
              processor=platform.processor() or platform.machine(), argv=" ".join(sys.argv),
              date=datetime.datetime.now().isoformat(timespec="seconds"))
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  versions = {}
  for mod in ("jax", "jaxlib", "flax", "equinox", "haiku", "keras", "torch"):
    m = sys.modules.get(mod)
    if m is not None:
      versions[mod] = getattr(m, "__version__", "?")
  info["versions"] = versions
  return info


def run(shapes, mode: str = "train", dtype: str = "float32", impls=("all",), repeats: int = 30,
        warmup: int = 3, gap_ms: float = 10.0, out_dir: str = "runs/benchmark", plot: bool = True,
        log=print) -> dict:
  """Times every implementation on every shape; writes JSON (+ PNG) to ``out_dir``.

  Returns the result dict.  An implementation that fails to build or run on a
  shape is recorded with its error and left out of that shape's timing.
  """
  import jax
  shapes = [parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes]
  names = default_impls(jax.default_backend()) if list(impls) == ["all"] else list(impls)
  # Empty lists timed nothing: an empty table, or matplotlib's "Number of rows" error.
  if not shapes or not names:
    raise ValueError(f"--shapes and --impls must each name at least one entry, got "
                     f"{len(shapes)} shape(s) and impls {list(impls)}")
  modes = ["train", "forward"] if mode == "both" else [mode]
  results = []
  for m in modes:
    for shape in shapes:
      steps, errors = {}, {}
      for name in names:
        try:
          step = build(name, shape, m, dtype)
          step()  # compile
          steps[name] = step
        except Exception as e:  # noqa: BLE001 - a peer that does not apply is reported, not fatal
          errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
          log(f"  {name} on {shape} ({m}): {errors[name]}")
          if os.environ.get("BENCHMARK_DEBUG"):
            traceback.print_exc()
      # Nothing built for this row (every implementation failed): keep the others' results.
      times = time_interleaved(steps, repeats, warmup, gap_ms / 1e3) if steps else {}
      row = {name: summarise(s, shape) for name, s in times.items()}
      for name, r in row.items():
        if "path" in steps[name].native:  # gru_jax's: the backend that ran
          r["path"] = steps[name].native["path"]
      ref = row.get(REFERENCE)
      for name, r in row.items():
        r["ratio_to_gru_jax"] = r["median_ms"] / ref["median_ms"] if ref else None
      results.append(dict(mode=m, shape=list(shape), dtype=dtype, timings=row, errors=errors))
      log(format_row(results[-1]))
  out = dict(machine=machine_info(), repeats=repeats, warmup=warmup, gap_ms=gap_ms,
             results=results)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "benchmark.json"), "w") as f:
    json.dump(out, f, indent=1)
  if plot:
    make_plot(out, os.path.join(out_dir, "benchmark.png"))
  log(format_table(out))
  return out


def format_row(res: dict) -> str:
  shape = "x".join(map(str, res["shape"]))
  parts = [f"{n} {r['median_ms']:.2f}" for n, r in res["timings"].items()]
  return f"{res['mode']} {shape}: " + ", ".join(parts)


def format_table(out: dict) -> str:
  """Markdown table: one row per (mode, shape), one column per implementation, 'ms (×ref)'."""
  names = []
  for res in out["results"]:
    names += [n for n in list(res["timings"]) + list(res["errors"]) if n not in names]
  lines = ["| step | B×T×D×H | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  for res in out["results"]:
    cells = []
    for n in names:
      r = res["timings"].get(n)
      if r is None:
        cells.append("n/a" if n in res["errors"] else "")
      elif r["ratio_to_gru_jax"] is None:
        cells.append(f"{r['median_ms']:.2f}")
      else:
        cells.append(f"{r['median_ms']:.2f} ({r['ratio_to_gru_jax']:.2f}×)")
    lines.append(f"| {res['mode']} | {'×'.join(map(str, res['shape']))} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)


def make_plot(out: dict, path: str) -> None:
  """Per mode: tokens/s against T (the shapes sharing the commonest B,D,H) and
  tokens/s for every shape (categorical axis); one line per implementation."""
  import collections
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  modes = sorted({r["mode"] for r in out["results"]})
  fig, axes = plt.subplots(len(modes), 2, figsize=(12, 4.5 * len(modes)), squeeze=False)
  for (ax_t, ax_s), m in zip(axes, modes):
    res = [r for r in out["results"] if r["mode"] == m]
    groups = collections.Counter((r["shape"][0], r["shape"][2], r["shape"][3]) for r in res)
    common = groups.most_common(1)[0][0]
    sel = sorted((r for r in res if (r["shape"][0], r["shape"][2], r["shape"][3]) == common),
                 key=lambda r: r["shape"][1])
    by_shape = sorted(res, key=lambda r: (r["shape"][3], r["shape"][1], r["shape"][0]))
    labels = ["×".join(map(str, r["shape"])) for r in by_shape]
    names = sorted({n for r in res for n in r["timings"]})
    for n in names:
      pts = [(r["shape"][1], r["timings"][n]["tokens_per_s"]) for r in sel if n in r["timings"]]
      if pts:
        ax_t.plot(*zip(*pts), marker="o", label=n)
      pts = [(i, r["timings"][n]["tokens_per_s"]) for i, r in enumerate(by_shape)
             if n in r["timings"]]
      ax_s.plot(*zip(*pts), marker="o", linestyle=":", label=n)
    ax_t.set(xlabel="T (sequence length)", ylabel="tokens/s", yscale="log",
             title=f"{m}, B={common[0]}, D={common[1]}, H={common[2]}")
    ax_s.set(ylabel="tokens/s", yscale="log", title=f"{m}, every shape B×T×D×H (by H, T)")
    ax_s.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    for ax in (ax_t, ax_s):
      ax.grid(True, alpha=0.3)
    ax_s.legend(fontsize=7, loc="best")
  info = out["machine"]
  fig.suptitle(f"{info['jax_device']} ({info.get('cpu_model', info['processor'])}), "
               f"{out['results'][0]['dtype']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(FLAGS.shapes, mode=FLAGS.mode, dtype=FLAGS.dtype, impls=FLAGS.impls,
      repeats=FLAGS.repeats, warmup=FLAGS.warmup, gap_ms=FLAGS.gap_ms, out_dir=FLAGS.out_dir)


if __name__ == "__main__":
  from experiments import cli
  cli.run(main)
