"""Keys every config has, so any of them can be overridden with --config.KEY=VALUE."""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64
  c.eval_batch_size = 0            # 0: same as batch_size
  c.num_epochs = 10
  c.num_train_steps = 0            # > 0 takes precedence over num_epochs
  c.learning_rate = 1e-3
  c.eval_every_steps = 0           # 0: once per epoch
  c.checkpoint_every_steps = 0     # 0: at every evaluation
  c.log_every_steps = 10
  c.preemption_check_every_steps = 10  # several processes: how often they agree on a stop
  #                                      (one small all-gather; one process checks every step)
  c.eval_splits = ("validation", "test")
  c.class_weights = ""             # "" or "balanced"
  c.bn_recalibrate_batches = 20    # re-estimate batch-norm statistics before eval from this
  #                                  many training batches (one epoch at most); 0 = off
  c.parallel = "jit"               # "jit" (sharded over a device mesh) or "pmap"
  c.data_shards = 0                # 0: each process loads the whole training split and keeps
  #                                  its slice of every batch; S: the split is read in S shards,
  #                                  each process reading only its S/num_processes of them
  c.remat = 0                      # > 0: recompute the scan in chunks of this many steps
  c.compute_dtype = "float32"      # or "bfloat16" (state and parameters stay float32)
  c.bucket_by_length = False       # group similar lengths into training batches
  c.trim_to_multiple = 0           # > 0: cut padding to the batch's longest sequence, rounded up
  c.debug_kill_at_step = 0         # > 0: SIGKILL itself after this step (crash-recovery tests)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"        # "adam" or "adamw"
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 1e-4  # adamw only
  c.optimizer.clip_norm = 0.0      # > 0: clip by global norm
  c.optimizer.schedule = "constant"  # or "warmup_cosine"
  c.optimizer.warmup_steps = 0

  c.model = ml_collections.ConfigDict()
  c.model.hidden_sizes = (128, 128)
  c.model.batch_norm = True
  c.model.dropout = 0.5
  c.model.input_dropout = 0.0
  c.model.recurrent_dropout = 0.0
  c.model.zoneout = 0.0            # > 0: zoneout (Krueger et al. 2016); runs the scan backend
  c.model.variant = "seed"
  c.model.attention = "none"       # "additive" | "multiplicative" (Seq2Seq datasets only)
  c.model.attention_size = 0       # its hidden width; 0: the top decoder layer's size
  c.model.bidirectional = False
  c.model.embed_dim = 64
  c.model.bn_momentum = 0.99
  c.model.bn_epsilon = 1e-3
  c.model.unroll = 1
  c.model.backend = "auto"         # "auto" | "xla" | "pallas" | "scan" (see gru_jax.gru)

  # Each config sets its own with dataset_config(); building digits' here would import
  # TensorFlow (its TFDS builder) into every config, the GPU check's included.
  c.dataset = ml_collections.ConfigDict({"name": "sequential_digits"})
  return c


def dataset_config(name: str, **values) -> ml_collections.ConfigDict:
  """``name`` and every option `gru_jax.data.load(name, ...)` takes (its defaults, updated
  with ``values``), so each can be set with --config.dataset.OPTION=VALUE."""
  from gru_jax import data  # pylint: disable=import-outside-toplevel
  defaults = data.options(name)
  unknown = sorted(set(values) - set(defaults))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; valid: {sorted(defaults)}")
  d = ml_collections.ConfigDict()
  d.name = name
  for key, default in defaults.items():
    value = values.get(key, default)
    # A typed None (e.g. data_dir), so that the command line can still set it.
    d[key] = ml_collections.config_dict.placeholder(str) if value is None else value
  return d
