"""What must stay exact under failure: kill -9 resume and ragged-batch row independence.

kill -9 at five moments of a tiny training run (checkpoints every 3 steps of 6): between
checkpoints, at the start and in the middle of a checkpoint write, during the very first
save, and right after a checkpoint commits. The killed run (a subprocess that SIGKILLs
itself from inside the named call) is resumed in this process and must end with params
bit-identical to an uninterrupted run's, with the same metrics log. Then 64 ragged
prompts decoded greedily in one batch equal each prompt decoded alone, row for row.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import decoding
import model
from scripts import metrics_lib, train_lib
from tests.decoding.conftest import random_params
from tests.reliability.harness import ROOT
from tests.scripts.test_train import tiny_config

# moment -> (python patched into the killed run, the step it fires at)
KILL_AT = {
    "mid-interval": ("metrics_lib.MetricWriter.write", 5, "before"),
    "start-of-write": ("checkpoint_lib.save_train_state", 6, "before"),
    "middle-of-write": ("ocp.JsonCheckpointHandler.async_save", 6, "before"),
    "first-save": ("ocp.JsonCheckpointHandler.async_save", 3, "before"),
    "after-commit": ("checkpoint_lib.save_train_state", 6, "after"),
}
# What the kill leaves in checkpoints/ (an unfinished save stays in orbax's temporary folder).
LEFT = {"mid-interval": ["3"], "start-of-write": ["3"],
        "middle-of-write": ["3", "6.orbax-checkpoint-tmp"],
        "first-save": ["3.orbax-checkpoint-tmp"], "after-commit": ["3", "6"]}


def _killed_run(workdir: str, moment: str) -> subprocess.CompletedProcess:
  target, step, when = KILL_AT[moment]
  owner, name = target.rsplit(".", 1)
  script = textwrap.dedent(f"""
      import os, signal
      import orbax.checkpoint as ocp
      from scripts import checkpoint_lib, metrics_lib, train_lib
      from tests.scripts.test_train import tiny_config
      owner = {owner}
      original = getattr(owner, {name!r})
      state = {{"step": 0}}
      def kill_at(*args, **kwargs):
        step = kwargs.get("step", args[1] if len(args) > 1 and isinstance(args[1], int) else None)
        if {name!r} == "async_save":  # step of the save under way
          step = state["step"]
        elif {name!r} == "save_train_state":
          state["step"] = step = args[1]
        if step == {step} and {when!r} == "before":
          os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if step == {step}:
          os.kill(os.getpid(), signal.SIGKILL)
        return out
      if {name!r} == "async_save":
        save = checkpoint_lib.save_train_state
        def tracking(mgr, step, *a, **k):
          state["step"] = step
          return save(mgr, step, *a, **k)
        checkpoint_lib.save_train_state = tracking
      setattr(owner, {name!r}, kill_at)
      train_lib.train_and_evaluate(tiny_config(), {workdir!r})
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  return workdir, train_lib.train_and_evaluate(tiny_config(), workdir)


@pytest.mark.parametrize("moment", list(KILL_AT))
def test_kill_9_then_resume_is_bit_identical(uninterrupted, tmp_path, moment):
  ref_dir, ref = uninterrupted
  workdir = str(tmp_path / "run")
  proc = _killed_run(workdir, moment)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == LEFT[moment]
  out = train_lib.train_and_evaluate(tiny_config(), workdir)
  for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = lambda w: [r["step"] for r in metrics_lib.read_metrics(w, "train")]
  assert steps(workdir) == steps(ref_dir) == list(range(1, 7))
  got = [r["loss"] for r in metrics_lib.read_metrics(workdir, "train")]
  want = [r["loss"] for r in metrics_lib.read_metrics(ref_dir, "train")]
  np.testing.assert_array_equal(got, want)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["step"] == 6


def test_64_ragged_prompts_decode_row_for_row_as_alone():
  cfg = model.get_preset("test")
  params = random_params(cfg, seed=3)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, 256, rng.randint(1, 17)).tolist() for _ in range(64)]
  step_fn = model.Decoder(cfg)
  batch = decoding.generate(params, prompts, step_fn, max_new_tokens=8)
  for i, p in enumerate(prompts):
    alone = decoding.generate(params, [p], step_fn, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batch.tokens[i]),
                                  err_msg=f"row {i} (prompt length {len(p)})")
