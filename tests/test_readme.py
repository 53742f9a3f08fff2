"""The README's API example runs and means what it says."""
import os

import numpy as np

from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(title, index=1, ns=None):
  """Runs the index-th python block under ``title`` in ``ns`` (a fresh namespace if None)."""
  text = open(os.path.join(ROOT, "README.md")).read()
  ns = {} if ns is None else ns
  code = text.split(title)[1].split("```python")[index].split("```")[0]
  exec(code, ns)  # pylint: disable=exec-used
  return ns


def test_readme_pure_function_example_runs_and_matches_reference():
  ns = _block("### The pure functions")
  assert ns["hs"].shape == (4, 20, 32) and ns["h_last"].shape == (4, 32)
  ref_last, ref_hs = reference.run(ns["params"], ns["xs"], mask=np.asarray(ns["mask"]))
  np.testing.assert_allclose(ns["hs"], ref_hs, atol=1e-5)
  np.testing.assert_allclose(ns["h_last"], ref_last, atol=1e-5)
  assert set(ns["grads"]._fields) == {"w_x", "w_h", "b_x", "b_h"}
  starts = np.asarray(ns["starts"])
  assert starts.any() and not starts.all()
  ref_next, ref_ep = reference.run_segments(ns["params"], ns["xs"], np.asarray(ns["h_last"]),
                                            resets=starts)
  np.testing.assert_allclose(ns["hs_ep"], ref_ep, atol=1e-5)
  np.testing.assert_allclose(ns["h_next"], ref_next, atol=1e-5)


def test_readme_nnx_example_trains_and_evaluates():
  ns = _block("### Layers for Flax NNX")
  assert ns["logits"].shape == (16, 10)
  model, xs = ns["model"], np.asarray(ns["xs"])
  assert model.rnn.layer_0.deterministic  # eval() reached the nested GRUs
  # The step learns: every label is 0, so more steps drive the loss down.
  model.train()
  losses = [float(ns["train_step"](model, ns["opt"], ns["xs"], ns["labels"])) for _ in range(30)]
  assert losses[-1] < 0.3 * float(ns["loss"])
  model.eval()
  h1 = reference.run(model.rnn.layer_0.params, xs)[1]
  np.testing.assert_allclose(model.rnn(xs), reference.run(model.rnn.layer_1.params, h1)[1],
                             atol=1e-5)


def test_readme_linen_example_runs_and_matches_reference():
  from gru_jax.cell import GRUParams
  ns = _block("### Layers and models (Flax Linen)")
  assert ns["hs"].shape == (4, 20, 128) and ns["logits"].shape == (4, 10)
  # Without dropout the layer is the reference GRU with its own parameters.
  p = GRUParams(**ns["variables"]["params"])
  out = ns["gru"].apply(ns["variables"], ns["xs"], ns["mask"])
  ref = reference.run(p, np.asarray(ns["xs"]), mask=np.asarray(ns["mask"]))[1]
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert float(np.abs(np.asarray(ns["hs"]) - ref).max()) > 1e-3  # dropout was on
  # nn.RNN of the GRUCell, on the layer's params: the reference at every valid step.
  np.testing.assert_allclose(np.where(np.asarray(ns["mask"])[..., None], ns["steps"], 0), ref,
                             atol=1e-5)


def test_readme_torch_example_matches_torch():
  import torch
  ns = _block("### Weights from other libraries")
  with torch.no_grad():
    want, h_n = ns["tm"](torch.from_numpy(np.array(ns["xs"])))  # a writable copy
  np.testing.assert_allclose(ns["hs"], want.numpy(), atol=1e-5)
  np.testing.assert_allclose(ns["h_last"], h_n[1].numpy(), atol=1e-5)


def test_readme_stacked_torch_example_matches_torch():
  import torch
  ns = _block("### Weights from other libraries")
  ns = _block("### Weights from other libraries", 2, ns)
  tm2 = ns["tm2"].eval()
  with torch.no_grad():
    want = tm2(torch.from_numpy(np.array(ns["xs"])))[0].numpy()
  assert ns["hs2"].shape == (4, 20, 128)
  np.testing.assert_allclose(ns["hs2"], want, atol=1e-5)
  ns["nnx_stack"].eval()  # tm2 was built in train mode, so its NNX twin starts with dropout on
  nnx_out = ns["nnx_stack"](ns["xs"])
  np.testing.assert_allclose(nnx_out, want, atol=1e-5)
