"""Trainer: overfitting, bit-exact resume, 1 vs 8 devices, NaN stop, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from model import sharding
from scripts import checkpoint_lib, data_lib, metrics_lib, train_lib
from scripts.configs.train import lm as train_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**sections):
  """The "test" preset with one layer (fast compiles) on the stdlib corpus, seq 32, batch 8."""
  c = train_config.get_config("test")
  c.unlock()
  c.model.n_layers = 1
  c.data.seq_len, c.data.batch_size = 32, 8
  c.train.update(steps=6, log_every=1, eval_every=0, eval_batches=1)
  c.ckpt.update(every=3, keep=5)
  c.opt.update(lr=1e-2, warmup_steps=2, min_lr_ratio=0.5)
  for name, kw in sections.items():
    c[name].update(kw)
  c.lock()
  return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "a")
  result = train_lib.train_and_evaluate(tiny_config(), workdir)
  return workdir, result


def _losses(workdir):
  return [r["loss"] for r in metrics_lib.read_metrics(workdir, "train")]


def test_overfits_one_batch(uninterrupted):
  c = tiny_config()  # the fixture's config: its compiled step is reused
  prog = train_lib._program(train_lib.model_config(c.model), ml_collections.FrozenConfigDict(c.opt),
                            c.train.steps, train_lib.Hooks(), sharding.make_mesh())
  batch = next(data_lib.BatchIterator(data_lib.load_split(c.data, "train"), 8, 32, seed=1))
  batch = jax.device_put(batch, prog.batch_sh)
  params = prog.init_params(jax.random.key(1))
  state = {"params": params, "opt_state": prog.init_opt(params),
           "step": jax.device_put(jnp.int32(0), prog.state_sh["step"])}
  losses = []
  for _ in range(40):
    state, m = prog.step(state, batch)
    losses.append(m["loss"])
  first, last = float(losses[0]), float(losses[-1])
  assert first > 4.0 and last < 0.2, (first, last)


def test_run_writes_outputs_and_learns(uninterrupted):
  workdir, result = uninterrupted
  s = result.summary
  assert s["step"] == 6 and os.path.exists(os.path.join(workdir, "summary.json"))
  losses = _losses(workdir)
  assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert s["val_bpb"] > 0 and 4.0 < s["unigram_entropy_bits"] < 6.0
  assert os.path.isdir(os.path.join(workdir, "tb"))
  params, model_cfg, step = checkpoint_lib.load_params(workdir)
  assert step == 6 and model_cfg == train_lib.model_config(tiny_config().model)
  jax.tree.map(np.testing.assert_array_equal, params, result.params)


def test_resume_is_bit_identical(uninterrupted, tmp_path):
  workdir, result = uninterrupted
  resumed = str(tmp_path / "b")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))  # "killed" after the step-3 save
  out = train_lib.train_and_evaluate(tiny_config(), resumed)
  jax.tree.map(np.testing.assert_array_equal, out.params, result.params)
  assert _losses(resumed) == _losses(workdir)  # the resumed log replaces steps 4..6


def test_one_and_eight_devices_agree(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  script = f"""
import json, jax
from tests.scripts.test_train import tiny_config
from scripts import train_lib
assert len(jax.devices()) == 8
c = tiny_config(mesh=dict(data=2, fsdp=4))
out = train_lib.train_and_evaluate(c, {str(tmp_path / "w8")!r})
q = out.params["layers_0"]["attn"]["q"]["kernel"]
print(json.dumps({{"spec": str(q.sharding.spec), "shards": len(q.addressable_shards)}}))
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "fsdp" in info["spec"] and info["shards"] == 8
  np.testing.assert_allclose(_losses(str(tmp_path / "w8")), _losses(workdir), rtol=1e-4)


def _poison_after(n):
  """An optimizer wrapper whose updates turn NaN from the (n+1)-th step on."""

  def wrap(tx):
    def init(params):
      return tx.init(params), jnp.zeros([], jnp.int32)

    def update(updates, state, params=None):
      updates, inner = tx.update(updates, state[0], params)
      bad = state[1] >= n
      updates = jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates)
      return updates, (inner, state[1] + 1)

    return optax.GradientTransformation(init, update)

  return wrap


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  c = tiny_config(train=dict(steps=8), ckpt=dict(every=2))
  with pytest.raises(train_lib.NonFiniteLossError, match="step 5.*Last good checkpoint: step 4"):
    train_lib.train_and_evaluate(c, workdir, hooks=train_lib.Hooks(wrap_optimizer=_poison_after(4)))
  mgr = checkpoint_lib.manager(workdir)
  assert mgr.all_steps() == [2, 4]
  params, _, _ = checkpoint_lib.load_params(workdir)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_init_params_start_finetuning(uninterrupted, tmp_path):
  workdir, result = uninterrupted
  before = jax.tree.map(np.asarray, result.params)
  train_lib.train_and_evaluate(tiny_config(), str(tmp_path / "ft"), init_params=result.params)
  jax.tree.map(np.testing.assert_array_equal, result.params, before)  # not donated away
  # Same seed and batches as the fresh run: only the starting params differ.
  assert _losses(str(tmp_path / "ft"))[0] < _losses(workdir)[0] - 0.5


@pytest.mark.parametrize("section,kw,match", [
    ("model", dict(preset="gpt-9"), "unknown model preset 'gpt-9'"),
    ("model", dict(n_heads=3), "n_heads=3 must divide d_model=64"),
    ("data", dict(seq_len=4096), "config.data.seq_len=4096 exceeds .* valid: 1..256"),
    ("data", dict(corpus="files", path="/no/such/dir"), "config.data.path='/no/such/dir'"),
    ("opt", dict(lr=-1.0), "config.opt.lr=-1.0"),
    ("data", dict(batch_size=0), "config.data.batch_size=0"),
])
def test_bad_config_fails_before_writing(tmp_path, section, kw, match):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=match):
    train_lib.train_and_evaluate(tiny_config(**{section: kw}), str(workdir))
  assert not workdir.exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file.txt"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="--workdir=.* is not writable"):
    train_lib.train_and_evaluate(tiny_config(), str(blocker / "sub"))


def test_cli_bad_preset_exits_nonzero(tmp_path):
  workdir = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "scripts.train", "--config=scripts/configs/train/lm.py:nope",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "unknown model preset 'nope'" in proc.stderr
  assert not workdir.exists()
