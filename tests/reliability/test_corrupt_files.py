"""Corrupt checkpoints: every damaged newest step is skipped with a warning or refused in one line.

One tiny training run (checkpoints at steps 3 and 6) is copied per case and damaged:
flipped bytes inside the array data (orbax alone reads them back silently), a truncated
or deleted array file, deleted or junk meta / iterator state, non-finite weights saved
with valid checksums, corrupt optimizer state. Through the API (`load_params`,
`load_meta`, `quant.restore`, `evaluate_checkpoint`, training resume) and the CLIs
(eval, prune, quantize, generate in subprocesses): a bad newest step falls back to step 3
with one `warning:` line naming the bad step, an explicit `--step` of a bad one is
refused, and a folder with no intact step is refused in one line naming it, with nothing
written to the output folder. A resume past a corrupt newest step ends bit-identical to
an uninterrupted run.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quant
from model import checkpoint as ckpt
from model import convert as model_convert
from model.convert import safetensors_io
from scripts import checkpoint_lib, eval_lib, train_lib
from tests.reliability.harness import assert_one_line, assert_refused, run_cli, snapshot
from tests.scripts.test_train import tiny_config

STEPS = (3, 6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("corrupt") / "run")
  result = train_lib.train_and_evaluate(tiny_config(), workdir)
  assert checkpoint_lib.manager(workdir).all_steps() == list(STEPS)
  return workdir, result


@pytest.fixture
def run(trained, tmp_path):
  """A private copy of the trained run."""
  dst = str(tmp_path / "run")
  shutil.copytree(trained[0], dst)
  return dst


def _step_dir(workdir, step):
  return os.path.join(workdir, ckpt.CKPT_SUBDIR, str(step))


def _data_files(workdir, step, item="params"):
  """The item's array data files, largest first."""
  root = os.path.join(_step_dir(workdir, step), item)
  files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs
           if os.sep + "d" + os.sep in os.path.join(r, f) + os.sep and "ocdbt.process" in r]
  assert files, root
  return sorted(files, key=os.path.getsize, reverse=True)


def flip_bytes(workdir, step, item="params"):
  path = _data_files(workdir, step, item)[0]
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = bytearray(f.read(64))
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0x5A for b in chunk))


def truncate(workdir, step):
  path = _data_files(workdir, step)[0]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)


def delete_item(workdir, step, item):
  shutil.rmtree(os.path.join(_step_dir(workdir, step), item))


def junk_json(workdir, step, item):
  for r, _, fs in os.walk(os.path.join(_step_dir(workdir, step), item)):
    for f in fs:
      if f != "commit_success.txt":
        with open(os.path.join(r, f), "w") as fh:
          fh.write("{not json")


def save_nan_step(workdir, step):
  """A params-only checkpoint whose weights hold a NaN (checksums valid: saved that way)."""
  params, cfg, _ = checkpoint_lib.load_params(workdir, 3)
  params["embed"]["embedding"] = params["embed"]["embedding"].at[5, 2].set(jnp.nan)
  checkpoint_lib.save_params(workdir, params, cfg, step=step)


DAMAGE = {
    "flipped-bytes": lambda w: flip_bytes(w, 6),
    "truncated-array-file": lambda w: truncate(w, 6),
    "deleted-params": lambda w: delete_item(w, 6, "params"),
    "deleted-meta": lambda w: delete_item(w, 6, "meta"),
    "junk-meta": lambda w: junk_json(w, 6, "meta"),
    "nan-weights": lambda w: (shutil.rmtree(_step_dir(w, 6)), save_nan_step(w, 6)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_load_params_skips_a_bad_newest_step_with_a_warning(run, trained, damage, capsys):
  DAMAGE[damage](run)
  params, meta, step = ckpt.load_params(run)
  assert step == 3 and meta["step"] == 3
  warning = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
  assert len(warning) == 1 and "step 6" in warning[0] and run in warning[0], warning
  with pytest.raises(ckpt.CheckpointError) as e:
    ckpt.load_params(run, 6)
  assert_one_line(str(e.value), "step 6", run)


def test_checksums_catch_what_orbax_reads_back_silently(run):
  flip_bytes(run, 6)
  raw, _, _ = ckpt.load_params(run, 6, verify=False)  # orbax alone: no error, wrong values
  good, _, _ = ckpt.load_params(run, 3)
  assert jax.tree.structure(raw) == jax.tree.structure(good)
  with pytest.raises(ckpt.CheckpointError, match=r"fails its checksum .*corrupt"):
    ckpt.load_params(run, 6)


def test_non_finite_weights_are_refused_naming_the_leaf(run):
  DAMAGE["nan-weights"](run)
  with pytest.raises(ValueError) as e:
    ckpt.load_params(run, 6)
  assert_one_line(str(e.value), "embed/embedding", "non-finite", "/6")


def test_no_intact_step_is_one_line_naming_the_folder(run, capsys):
  flip_bytes(run, 6)
  junk_json(run, 3, "meta")
  with pytest.raises(ckpt.CheckpointError) as e:
    ckpt.load_params(run)
  assert_one_line(str(e.value), "no intact checkpoint", os.path.join(run, ckpt.CKPT_SUBDIR))
  assert len([ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]) == 2


def test_load_meta_falls_back_past_junk_meta(run):
  junk_json(run, 6, "meta")
  assert ckpt.load_meta(run)["step"] == 3


def test_quant_restore_falls_back(run, tmp_path):
  params, cfg, _ = checkpoint_lib.load_params(run)
  qdir = str(tmp_path / "q")
  qp, _ = quant.quantize(params, "int8")
  quant.save(qdir, qp, recipe="int8", model_cfg=cfg)
  quant.save(qdir, qp, recipe="int8", model_cfg=cfg, step=1)
  flip_bytes(qdir, 1)
  restored, meta = quant.restore(qdir)
  assert meta["step"] == 0
  np.testing.assert_array_equal(jax.tree.leaves(restored)[0], jax.tree.leaves(qp)[0])


def test_evaluate_checkpoint_falls_back_and_names_the_step(run, capsys):
  flip_bytes(run, 6)
  r = eval_lib.evaluate_checkpoint(run, splits=("val",), max_batches=1)
  assert r["step"] == 3 and np.isfinite(r["val"]["loss"])
  assert "skipping checkpoint step 6" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flipped-params", "flipped-opt-state", "junk-data-state"])
def test_resume_past_a_corrupt_newest_step_is_bit_identical(trained, tmp_path, damage, capsys):
  """Training resumes from step 3, sets step 6 aside, and retrains it to the same params."""
  workdir, reference = trained
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  {"flipped-params": lambda: flip_bytes(run, 6),
   "flipped-opt-state": lambda: flip_bytes(run, 6, "opt_state"),
   "junk-data-state": lambda: junk_json(run, 6, "data")}[damage]()
  result = train_lib.train_and_evaluate(tiny_config(), run)
  err = capsys.readouterr().err
  assert "skipping train checkpoint step 6" in err and "resuming from step 3" in err
  moved = [n for n in os.listdir(os.path.join(run, ckpt.CKPT_SUBDIR)) if n.startswith("6.bad-")]
  assert len(moved) == 1
  for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(reference.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_every_step_corrupt_is_refused(run):
  flip_bytes(run, 6)
  flip_bytes(run, 3)
  with pytest.raises(ckpt.CheckpointError) as e:
    train_lib.train_and_evaluate(tiny_config(), run)
  assert_one_line(str(e.value), "no intact train checkpoint", run)


# --- The CLIs (subprocesses): warning and fallback, or exit 2 and one line.


def test_eval_cli_falls_back_with_one_warning_line(run):
  flip_bytes(run, 6)
  proc = run_cli("scripts.eval", f"--workdir={run}", "--split=val", "--max_batches=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
  assert len(warnings) == 1 and "step 6" in warnings[0] and "Traceback" not in proc.stderr
  assert os.path.exists(os.path.join(run, "eval_step3.json"))


@pytest.mark.parametrize("cli, args", [
    ("scripts.eval", ["--split=val"]),
    ("scripts.prune", ["--prune=magnitude:0.5"]),
    ("scripts.quantize", ["--quant=int8"]),
    ("scripts.generate", ["--prompt=hi", "--max_new_tokens=2"]),
])
def test_clis_refuse_a_folder_with_no_intact_step(run, tmp_path, cli, args):
  flip_bytes(run, 6)
  truncate(run, 3)
  out = str(tmp_path / "out")
  src = "--model" if cli == "scripts.generate" else "--workdir"
  extra = [] if cli in ("scripts.eval", "scripts.generate") else [f"--out={out}"]
  before = snapshot(run)
  proc = run_cli(cli, f"{src}={run}", *args, *extra)
  assert_refused(proc, "no intact", os.path.join(run, ckpt.CKPT_SUBDIR))
  assert not os.path.exists(out)
  assert {k for k in snapshot(run)} == set(before)  # nothing added next to the checkpoints


# --- Hugging Face safetensors (no checksum in the format: header checks and finiteness).


def _hf_dir(trained, tmp_path):
  params, cfg, _ = checkpoint_lib.load_params(trained[0])
  out = str(tmp_path / "hf")
  model_convert.export_hf(cfg, params, out)
  return out, os.path.join(out, "model.safetensors")


def _poison_tensor(file, name):
  """Overwrites tensor `name`'s first value with NaN, in place (header untouched)."""
  info = safetensors_io.read_header(file)[name]
  with open(file, "r+b") as f:
    f.seek(info.start)
    f.write(np.array([np.nan], info.dtype).tobytes())


@pytest.mark.parametrize("damage, names", [
    ("nan-tensor", ["model.embed_tokens.weight", "non-finite", "model.safetensors"]),
    ("truncated", ["model.safetensors", "file size"]),
    ("junk-header", ["model.safetensors", "header"]),
])
def test_corrupt_safetensors_are_refused_naming_the_file(trained, tmp_path, damage, names):
  hf, file = _hf_dir(trained, tmp_path)
  if damage == "nan-tensor":
    _poison_tensor(file, "model.embed_tokens.weight")
  elif damage == "truncated":
    with open(file, "r+b") as f:
      f.truncate(os.path.getsize(file) - 100)
  else:
    with open(file, "r+b") as f:
      f.seek(8)
      f.write(b"{junk" * 4)
  with pytest.raises(ValueError) as e:
    model_convert.load_hf(hf)
  assert_one_line(str(e.value), *names)
