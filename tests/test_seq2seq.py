"""Sequence to sequence: the number_words data, the Seq2Seq model, greedy decoding, training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gru_jax import data, models, train
from gru_jax.cell import GRUParams
from gru_jax.data import synthetic
from tests import reference

SMALL = dict(num_train=64, num_validation=16, num_test=16)


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (7, "seven"), (10, "ten"), (15, "fifteen"), (20, "twenty"),
    (42, "forty two"), (100, "one hundred"), (110, "one hundred ten"),
    (1000, "one thousand"), (1007, "one thousand seven"), (30015, "thirty thousand fifteen"),
    (100000, "one hundred thousand"), (219018, "two hundred nineteen thousand eighteen"),
    (999999, "nine hundred ninety nine thousand nine hundred ninety nine")])
def test_number_to_words_known_answers(n, words):
  assert synthetic.number_to_words(n) == words.split()


def _decode(vocab, row):
  return [vocab[t] for t in row if t != synthetic.WORDS_PAD]


def test_number_words_arrays_spell_their_numbers_and_splits_are_disjoint():
  splits = {s: data.load("number_words", s, num_train=3000, num_validation=2000,
                         num_test=2000) for s in data.SPLITS}
  numbers = {}
  for split, (a, info) in splits.items():
    vocab = info.extras["vocab"]
    assert info.task == "seq2seq" and info.num_classes == len(vocab) == 43
    assert a["inputs"].shape == a["mask"].shape == (len(a["inputs"]), 6)
    assert a["labels"].shape == a["decoder_inputs"].shape == a["label_mask"].shape
    nums = []
    for i in range(len(a["inputs"])):
      digits = _decode(vocab, a["inputs"][i])
      assert digits == [vocab[t] for t in a["inputs"][i][a["mask"][i]]]
      n = int("".join(digits))
      assert str(n) == "".join(digits)  # no leading zeros
      words = synthetic.number_to_words(n)
      assert _decode(vocab, a["labels"][i]) == words + ["<eos>"]
      assert _decode(vocab, a["decoder_inputs"][i]) == ["<bos>"] + words
      assert a["label_mask"][i].sum() == len(words) + 1
      nums.append(n)
    numbers[split] = set(nums)
    # Digit counts drawn uniformly among those the split holds numbers of (train: all six;
    # the hash leaves no one-digit number to validation or test).
    counts = np.bincount([len(str(n)) for n in nums], minlength=7)[1:]
    held = [k for k in range(1, 7) if (synthetic._number_split(
        np.arange(10 ** (k - 1) if k > 1 else 0, 10 ** k)) == data.SPLITS.index(split)).any()]
    assert [k for k in range(1, 7) if counts[k - 1]] == held
    assert counts[np.array(held) - 1].min() > 0.6 * len(nums) / len(held)
  assert len(held) == 5 and len({len(str(n)) for n in numbers["train"]}) == 6
  # The longest reading fills the target: 9 words and <eos>, no column that is always padding.
  assert len(synthetic.number_to_words(777_777)) == synthetic.WORDS_MAX_WORDS == 9
  assert splits["train"][0]["label_mask"][:, -1].any()
  assert not numbers["train"] & numbers["test"]
  assert not numbers["train"] & numbers["validation"]
  assert not numbers["validation"] & numbers["test"]
  again = data.load("number_words", "test", num_train=3000, num_validation=2000, num_test=2000)
  np.testing.assert_array_equal(again[0]["inputs"], splits["test"][0]["inputs"])


def test_reversal_arrays_are_each_string_and_its_reverse():
  a, info = data.load("reversal", "train", num_train=4000, min_len=3, max_len=9,
                      num_symbols=5)
  vocab, ex = info.extras["vocab"], info.extras
  assert vocab == ["<pad>", "<bos>", "<eos>", "a", "b", "c", "d", "e"]
  assert info.task == "seq2seq" and info.seq_len == 9 and ex["target_len"] == 10
  lengths = a["mask"].sum(1)
  for i in range(len(lengths)):
    n = lengths[i]
    src = "".join(vocab[t] for t in a["inputs"][i][:n])
    assert a["mask"][i][:n].all() and (a["inputs"][i][n:] == 0).all()
    assert set(src) <= set("abcde")
    assert "".join(vocab[t] for t in a["labels"][i][:n]) == src[::-1]
    assert a["labels"][i][n] == ex["eos_id"] and (a["labels"][i][n + 1:] == 0).all()
    assert list(a["decoder_inputs"][i][:n + 1]) == [ex["bos_id"]] + list(a["labels"][i][:n])
    assert a["label_mask"][i].sum() == n + 1
  # Lengths uniform on [3, 9] and symbols uniform: 4000 draws, within 5 sigma.
  counts = np.bincount(lengths, minlength=10)[3:]
  assert len(counts) == 7 and np.abs(counts - 4000 / 7).max() < 5 * np.sqrt(4000 / 7)
  letters = np.bincount(a["inputs"][a["mask"]], minlength=8)[3:]
  assert np.abs(letters / letters.sum() - 0.2).max() < 0.01
  other, _ = data.load("reversal", "test", num_test=50, min_len=3, max_len=9, num_symbols=5)
  assert not np.array_equal(other["inputs"][:50], a["inputs"][:50])
  for kw, match in [(dict(min_len=0), "min_len must be an int >= 1"),
                    (dict(min_len=5, max_len=4), "max_len must be an int >= 5"),
                    (dict(num_symbols=27), r"num_symbols must be an int in \[2, 26\]")]:
    with pytest.raises(ValueError, match=match):
      data.load("reversal", "validation", **kw)


def _np_dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def reference_logits(p, src, mask, dec, *, layers, bidirectional, variant):
  """float64 logits [B,L,V] of the Seq2Seq without attention with params ``p``, composed
  from the reference GRU."""
  m = np.asarray(mask)
  x = np.asarray(p["src_embed"]["embedding"], np.float64)[np.asarray(src)]
  for i in range(layers):
    dirs = [GRUParams(**p[f"encoder_{i}_{k}"]) for k in range(2 if bidirectional else 1)]
    runs = [reference.run(q, x, mask=m, reverse=k == 1, variant=variant)
            for k, q in enumerate(dirs)]
    x = np.concatenate([r[1] for r in runs], -1)
    context = np.concatenate([r[0] for r in runs], -1)
  e = np.asarray(p["tgt_embed"]["embedding"], np.float64)[np.asarray(dec)]
  b, l = dec.shape
  c = np.broadcast_to(context[:, None], (b, l, context.shape[-1]))
  h = np.concatenate([e, c], -1)
  for i in range(layers):
    h0 = np.tanh(_np_dense(p[f"bridge_{i}"], context))
    h = reference.run(GRUParams(**p[f"decoder_{i}"]), h, h0=h0, variant=variant)[1]
  return _np_dense(p["head"], np.concatenate([h, e, c], -1))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_seq2seq_logits_match_a_float64_composition_of_the_reference(bidirectional):
  rs = np.random.RandomState(0)
  b, s, l, v = 3, 5, 4, 11
  src = jnp.asarray(rs.randint(1, v, (b, s)), jnp.int32)
  mask = jnp.arange(s)[None] < jnp.array([5, 3, 1])[:, None]
  dec = jnp.asarray(rs.randint(1, v, (b, l)), jnp.int32)
  model = models.Seq2Seq(v, v, hidden_sizes=(6, 5), embed_dim=4, bidirectional=bidirectional,
                         variant="reset_after")
  var = model.init(jax.random.key(0), src, mask, decoder_inputs=dec)
  logits = model.apply(var, src, mask, decoder_inputs=dec)
  expected = reference_logits(var["params"], src, mask, dec, layers=2,
                              bidirectional=bidirectional, variant="reset_after")
  np.testing.assert_allclose(logits, expected, atol=2e-5)


@pytest.mark.parametrize("attention", models.ATTENTIONS)
def test_greedy_decode_is_the_argmax_of_the_teacher_forced_model_step_by_step(attention):
  rs = np.random.RandomState(1)
  src = jnp.asarray(rs.randint(3, 13, (4, 6)), jnp.int32)
  mask = jnp.arange(6)[None] < jnp.array([6, 2, 4, 1])[:, None]
  model = models.Seq2Seq(43, 43, hidden_sizes=(8, 8), embed_dim=5, dropout=0.3,
                         attention=attention)
  var = model.init(jax.random.key(2), src, mask, decoder_inputs=src[:, :3])
  # An eos id that random weights emit somewhere, so stopping is exercised too.
  probe = models.greedy_decode(model, var, src, mask, max_len=7, bos_id=1, eos_id=-1)
  eos = int(probe[0, 2])
  out = np.asarray(models.greedy_decode(model, var, src, mask, max_len=7, bos_id=1, eos_id=eos,
                                        pad_id=0))
  # Teacher-forced on [<bos>, greedy tokens so far]: causal, so position t sees only 0..t.
  forced = jax.jit(lambda d: model.apply(var, src, mask, decoder_inputs=d))
  prefix = np.concatenate([np.ones((4, 1), np.int32), out[:, :-1]], 1)
  argmax = np.asarray(jnp.argmax(forced(jnp.asarray(prefix)), -1))
  for i in range(4):
    for t in range(7):
      assert out[i, t] == argmax[i, t], (i, t)
      if out[i, t] == eos:
        assert (out[i, t + 1:] == 0).all()
        break
  assert (out == eos).any()


def test_seq2seq_bad_inputs():
  model = models.Seq2Seq(5, 5, hidden_sizes=(4,))
  src = jnp.ones((2, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"inputs must be int tokens of rank 2, got float32 \(2, 3, 1\)"):
    model.init(jax.random.key(0), jnp.ones((2, 3, 1)), decoder_inputs=src)
  with pytest.raises(ValueError, match=r"mask must have shape \[B,S\]=\(2, 3\), got \(3, 2\)"):
    model.init(jax.random.key(0), src, jnp.ones((3, 2), bool), decoder_inputs=src)
  with pytest.raises(ValueError, match=r"share the batch size"):
    model.init(jax.random.key(0), src, decoder_inputs=jnp.ones((3, 2), jnp.int32))
  v = model.init(jax.random.key(0), src, decoder_inputs=src)
  for kwargs, match in [(dict(max_len=0), "max_len must be an int >= 1, got 0"),
                        (dict(max_len=2.5), "max_len must be an int >= 1, got 2.5"),
                        (dict(bos_id=5), r"bos_id must be an int in \[0, num_outputs=5\), got 5"),
                        (dict(bos_id=-1), r"bos_id must be an int in \[0, num_outputs=5\)"),
                        (dict(eos_id=7), r"eos_id must be an int in \[-1, num_outputs=5\), got 7"),
                        (dict(pad_id=1.0), r"pad_id must be an int .* got 1.0")]:
    args = {**dict(max_len=3, bos_id=1, eos_id=2), **kwargs}
    with pytest.raises(ValueError, match=match):
      models.greedy_decode(model, v, src, **args)
  # Out-of-vocabulary ids would embed as NaN and decode as a silent run of pad_id.
  with pytest.raises(ValueError, match=r"Seq2Seq: inputs must be token ids in \[0, 5\), got \[9\]"):
    models.greedy_decode(model, v, src.at[0, 1].set(9), max_len=3, bos_id=1, eos_id=2)
  with pytest.raises(ValueError, match=r"decoder_inputs must be token ids in \[0, 5\), got \[5\]"):
    model.apply(v, src, decoder_inputs=src.at[1, 0].set(5))


def test_greedy_decode_takes_lists_and_numpy_arrays():
  model = models.Seq2Seq(6, 6, hidden_sizes=(4,))
  src = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
  mask = src != 0
  v = model.init(jax.random.key(0), src, decoder_inputs=src)
  want = models.greedy_decode(model, v, jnp.asarray(src), jnp.asarray(mask), max_len=4,
                              bos_id=1, eos_id=-1)
  got = models.greedy_decode(model, v, src.tolist(), mask, max_len=np.int64(4),
                             bos_id=jnp.int32(1), eos_id=np.int8(-1))
  np.testing.assert_array_equal(got, want)


def _words_config(steps):
  from tests.test_configs import load_config
  c = load_config("number_words")
  c.num_train_steps = steps
  c.eval_every_steps = steps
  c.log_every_steps = 50
  c.dataset.update(num_train=20_000, num_validation=500, num_test=500)
  return c


@pytest.mark.slow
def test_training_learns_and_sequence_accuracy_is_greedy_exact_match(tmp_path):
  c = _words_config(300)
  wd = str(tmp_path / "wd")
  results = train.train_and_evaluate(c, wd)
  # Measured 0.79 test sequence accuracy at step 300 on the full data; a model that ignored
  # its source could not spell more than a handful of numbers.
  assert results["test"]["sequence_accuracy"] > 0.4, results["test"]
  assert results["test"]["accuracy"] > 0.9
  _, model, variables, info = train.restore_for_inference(wd)
  a, _ = data.load("number_words", "test", num_train=20_000, num_validation=500, num_test=500)
  ex = info.extras
  out = np.asarray(jax.jit(lambda s, m: models.greedy_decode(
      model, variables, s, m, max_len=ex["target_len"], bos_id=ex["bos_id"],
      eos_id=ex["eos_id"]))(a["inputs"], a["mask"]))
  exact = [list(out[i][a["label_mask"][i]]) == list(a["labels"][i][a["label_mask"][i]])
           and (out[i][~a["label_mask"][i]] == ex["pad_id"]).all() for i in range(len(out))]
  assert np.mean(exact) == pytest.approx(results["test"]["sequence_accuracy"], abs=1e-9)
  # The command-line translation is the same greedy decoding.
  from experiments import sample
  i = int(np.argmax(exact))
  digits = "".join(info.extras["vocab"][t] for t in a["inputs"][i][a["mask"][i]])
  assert sample.translate(model, variables, info, digits).split() == \
      synthetic.number_to_words(int(digits))
  with pytest.raises(ValueError, match="unknown"):
    sample.translate(model, variables, info, "12a")
  with pytest.raises(ValueError, match="unknown"):
    sample.translate(model, variables, info, "1\u00b2")  # '1²': isdigit(), yet not a digit token
  # Leading zeros are dropped, as the data spells numbers without them.
  assert sample.translate(model, variables, info, "00" + digits[:4]) == \
      sample.translate(model, variables, info, str(int(digits[:4])))
  # Beam search: at one beam, the trainer's greedy metric exactly; at three, a run as good.
  acc = train.decode_accuracy(wd, [1, 3])
  assert acc[1] == pytest.approx(results["test"]["sequence_accuracy"], abs=1e-9)
  assert acc[3] > 0.4, acc
  assert sample.translate(model, variables, info, digits, beam_size=3).split() == \
      synthetic.number_to_words(int(digits))


def test_create_model_applies_overrides_to_seq2seq():
  c = _words_config(1)
  c.model.dropout, c.model.recurrent_dropout = 0.3, 0.2
  _, info = data.load("number_words", "test", num_train=20_000, num_validation=500,
                      num_test=500)
  m = train.create_model(c, info, hidden_sizes=(4,))
  assert isinstance(m, models.Seq2Seq) and m.hidden_sizes == (4,) and m.dropout == 0.3
  r = train.recalibration_model(c, info)
  assert (r.dropout, r.recurrent_dropout) == (0.0, 0.0)
  c.model.zoneout = 0.1  # reaches every GRU of the Seq2Seq
  assert train.create_model(c, info).zoneout == 0.1


def test_seq2seq_config_errors(tmp_path):
  c = _words_config(1)
  c.model.batch_norm = True
  with pytest.raises(ValueError, match="batch_norm=False"):
    train.train_and_evaluate(c, str(tmp_path / "a"))
  c = _words_config(1)
  c.trim_to_multiple = 2
  with pytest.raises(ValueError, match="trim_to_multiple"):
    train.train_and_evaluate(c, str(tmp_path / "b"))
