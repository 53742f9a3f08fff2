import os

# Keras must pick its backend before it is first imported anywhere.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

from tests.e2e_util import JAX_CACHE_ENV  # noqa: E402

# Most of the suite's time is XLA compiling the same programs on every run, so
# the in-process tests share the training subprocesses' persistent cache: a
# rerun compiles only what changed.  GRU_JAX_TEST_JAX_CACHE=off runs cold.
if JAX_CACHE_ENV:
  jax.config.update("jax_compilation_cache_dir", JAX_CACHE_ENV["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
