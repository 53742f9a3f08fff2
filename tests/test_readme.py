"""The README's API example runs and means what it says."""
import os

import numpy as np

from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_pure_function_example_runs_and_matches_reference():
  text = open(os.path.join(ROOT, "README.md")).read()
  block = text.split("### The pure functions")[1].split("```python")[1].split("```")[0]
  ns = {}
  exec(block, ns)  # pylint: disable=exec-used
  assert ns["hs"].shape == (4, 20, 32) and ns["h_last"].shape == (4, 32)
  ref_last, ref_hs = reference.run(ns["params"], ns["xs"], mask=np.asarray(ns["mask"]))
  np.testing.assert_allclose(ns["hs"], ref_hs, atol=1e-5)
  np.testing.assert_allclose(ns["h_last"], ref_last, atol=1e-5)
  assert set(ns["grads"]._fields) == {"w_x", "w_h", "b_x", "b_h"}
