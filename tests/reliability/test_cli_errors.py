"""Bad input to the CLIs and their libraries: one line naming the flag or file, nothing written.

Covered (issue 17, classes 7, 8, 9-speculative and 10), through the Python API:
  - metrics.jsonl: a torn last line is dropped with a warning naming the file (read and
    resume); a malformed earlier line or a non-record is a ValueError naming file and line.
  - cli_lib.read_json: junk, missing, non-UTF-8 and non-object JSON name the file.
  - --model / --workdir / --hf_dir / --draft folders: junk, non-HF or missing config.json,
    an empty or absent folder (named by the flag the user typed, never --workdir for --model).
  - tokenizers: a junk tokenizer.json, a junk tokenizer_config.json beside it, a missing one.
  - generate: beam / speculative flags given with another --method, --output in a missing
    folder, all refused before the model loads.
  - prune / quantize: an --out that already holds a checkpoint, refused before loading.
and through real CLI subprocesses (exit 2, one `error:` line, no traceback, nothing written):
  an unknown config override key (scripts.train), a missing or unparsable config file, an
  unparsable override value, an override below a scalar field, an unknown flag, a stray
  argument, an OSError from a main, generate with a junk --model config.json / a junk
  tokenizer.json / a speculative flag without --method=speculative, convert from a junk
  --hf_dir, prune / quantize into a used --out (and quantize logs no orbax INFO lines on
  success).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

import model
from model.tokenizer import get_tokenizer
from scripts import (
  checkpoint_lib,
  cli_lib,
  convert_lib,
  decode_lib,
  generate_lib,
  metrics_lib,
  prune_lib,
  quantize_lib,
)
from tests.reliability.harness import ROOT, assert_one_line, assert_refused, run_cli, snapshot

CFG = model.get_preset("test")
JUNK = '{"model_type": '  # a config.json cut short


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A sparq workdir with one params checkpoint (step 3) of the test preset."""
  d = str(tmp_path_factory.mktemp("run"))
  checkpoint_lib.save_params(d, model.init(CFG, jax.random.key(0)), CFG, step=3)
  return d


@pytest.fixture(scope="module")
def used_out(run_dir, tmp_path_factory):
  """An output folder that already holds a checkpoint (a second prune / quantize into it)."""
  d = str(tmp_path_factory.mktemp("used"))
  shutil.copytree(os.path.join(run_dir, checkpoint_lib.CKPT_SUBDIR),
                  os.path.join(d, checkpoint_lib.CKPT_SUBDIR))
  return d


def _write(path, text: str | bytes) -> str:
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, "wb" if isinstance(text, bytes) else "w") as f:
    f.write(text)
  return str(path)


def _raises(fn, *names, kind=ValueError) -> str:
  with pytest.raises(kind) as e:
    fn()
  assert_one_line(str(e.value), *names)
  return str(e.value)


# --- class 7: metrics.jsonl -------------------------------------------------------------

RECORDS = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]


def _log(tmp_path, tail: str) -> str:
  lines = "".join(json.dumps(r) + "\n" for r in RECORDS)
  return _write(tmp_path / "metrics.jsonl", lines + tail)


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
  path = _log(tmp_path, '{"step": 4, "split": "tr')
  assert metrics_lib.read_metrics(str(tmp_path), "train") == RECORDS
  warning = capsys.readouterr().err.strip()
  assert_one_line(warning, path, "line 4")


def test_resume_truncates_past_a_torn_last_line(tmp_path, capsys):
  path = _log(tmp_path, '{"step": 4, "spl')
  writer = metrics_lib.MetricWriter(str(tmp_path), resume_step=2)
  writer.write(3, "train", {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3]
  assert path in capsys.readouterr().err


@pytest.mark.parametrize("bad", ['{"step": 2, "spl', "[1, 2]", '{"split": "train"}', "\xff"])
def test_malformed_inner_line_names_file_and_line(tmp_path, bad):
  lines = [json.dumps(RECORDS[0]), bad, json.dumps(RECORDS[1])]
  path = _write(tmp_path / "metrics.jsonl", "\n".join(lines) + "\n")
  _raises(lambda: metrics_lib.read_metrics(str(tmp_path)), path, "line 2")
  _raises(lambda: metrics_lib.MetricWriter(str(tmp_path), resume_step=5), path, "line 2")


# --- class 8: JSON files and the folders that hold them --------------------------------

@pytest.mark.parametrize("content, reason", [
    ("{not json", "is not valid JSON (line 1 column 2"),
    (b"\xff\xfe\x00junk", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (None, "does not exist"),
])
def test_read_json_names_the_file_and_the_flag(tmp_path, content, reason):
  path = str(tmp_path / "config.json")
  if content is not None:
    _write(path, content)
  _raises(lambda: cli_lib.read_json(path, "--model=/x"), "--model=/x", path, reason)


@pytest.mark.parametrize("config, reason", [
    (JUNK, "is not valid JSON (line 1 column 16: Expecting value)"),
    ('{"steps": 10}', "names no model_type or architectures"),
    (None, "holds neither a Hugging Face config.json nor sparq checkpoints"),
    ("ABSENT", "does not exist"),
])
def test_model_folder_errors_name_the_flag(tmp_path, config, reason):
  d = tmp_path / "m"
  if config is None:
    os.makedirs(d)
  elif config != "ABSENT":
    _write(d / "config.json", config)
  msg = _raises(lambda: convert_lib.model_kind(str(d), "--model"), f"--model={d}", reason)
  assert "--workdir" not in msg


def test_junk_run_config_does_not_hide_checkpoints(run_dir, tmp_path):
  """A sparq workdir's own config.json is not read to load it: junk there is no error."""
  d = tmp_path / "run"
  shutil.copytree(run_dir, d)
  _write(d / "config.json", JUNK)
  assert convert_lib.model_kind(str(d), "--model") == "sparq"


def test_generate_load_names_model_not_workdir(tmp_path):
  _write(tmp_path / "config.json", JUNK)
  msg = _raises(lambda: decode_lib.load(str(tmp_path)), f"--model={tmp_path}",
                str(tmp_path / "config.json"))
  assert "--workdir" not in msg


@pytest.mark.parametrize("config, reason", [
    (JUNK, "is not valid JSON"), (None, "has no config.json"), ("[]", "expected a JSON object")])
def test_convert_hf_dir_errors_write_nothing(tmp_path, config, reason):
  hf, out = tmp_path / "hf", tmp_path / "out"
  os.makedirs(hf)
  if config is not None:
    _write(hf / "config.json", config)
  _raises(lambda: convert_lib.run_conversion("sparq", str(hf), str(out)),
          f"--hf_dir={hf}", reason)
  assert not out.exists()


def test_prune_names_a_junk_hf_config_under_workdir(tmp_path):
  _write(tmp_path / "hf" / "config.json", JUNK)
  out = tmp_path / "out"
  _raises(lambda: prune_lib.prune_checkpoint(str(tmp_path / "hf"), "magnitude:0.5", str(out)),
          f"--workdir={tmp_path / 'hf'}", "config.json", "not valid JSON")
  assert not out.exists()


def test_junk_tokenizer_json_is_a_value_error_naming_it(tmp_path):
  path = _write(tmp_path / "tokenizer.json", '{"model": 3')
  _raises(lambda: get_tokenizer(path), path, "not a valid tokenizer.json")
  _raises(lambda: get_tokenizer(str(tmp_path)), path, "not a valid tokenizer.json")
  _raises(lambda: convert_lib.load_tokenizer(path), f"--tokenizer={path}", path)


def test_junk_file_beside_a_tokenizer_is_named(tmp_path):
  path = _write(tmp_path / "tokenizer.json", "{}")
  side = _write(tmp_path / "tokenizer_config.json", "{bos")
  _raises(lambda: convert_lib.load_tokenizer(path, f"--model={tmp_path}"),
          f"--model={tmp_path}", side, "not valid JSON")


def test_missing_tokenizer_names_the_flag(tmp_path):
  path = str(tmp_path / "nope.json")
  _raises(lambda: decode_lib.load(None, preset="test", tokenizer=path), f"--tokenizer={path}",
          "does not exist")


# --- class 9: speculative / beam flags without their method -----------------------------

def _flags(**kw) -> dict:
  values = dict(model=None, preset="test", step=None, tokenizer="auto", prompt=["hi"],
                method="sample", max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0,
                min_p=0.0, repetition_penalty=1.0, seed=0, stop=[], beam_width=4,
                length_penalty=1.0, num_return=1, draft=None, gamma=4, gamma_max=None,
                schedule="fixed", kv_quant=None, attn_qk=None, attn_select=None, evict=None,
                stream=False, output=None)
  return {**values, **kw}


@pytest.mark.parametrize("method, given, names", [
    ("sample", dict(gamma=3), ["--gamma", "--method=speculative", "--method=sample"]),
    ("sample", dict(draft="exit:1", schedule="heuristic"), ["--draft", "--schedule"]),
    ("beam", dict(gamma_max=8), ["--gamma_max", "--method=beam"]),
    ("sample", dict(beam_width=2), ["--beam_width", "--method=beam"]),
    ("speculative", dict(draft="exit:1", num_return=2), ["--num_return", "--method=beam"]),
])
def test_method_flags_given_with_another_method_are_refused(method, given, names):
  values = _flags(method=method, **given)
  _raises(lambda: generate_lib.generate_from_flags(values, present=["prompt", *given]), *names)


def test_output_in_a_missing_folder_fails_before_loading(tmp_path):
  path = str(tmp_path / "nodir" / "out.json")
  values = _flags(output=path, model=str(tmp_path / "never_read"), preset=None)
  _raises(lambda: generate_lib.generate_from_flags(values), f"--output={path}",
          "does not exist")


def test_junk_draft_folder_fails_before_the_target_loads(tmp_path):
  _write(tmp_path / "draft" / "config.json", JUNK)
  values = _flags(method="speculative", draft=str(tmp_path / "draft"),
                  model=str(tmp_path / "never_read"), preset=None)
  _raises(lambda: generate_lib.generate_from_flags(values), f"--draft={tmp_path / 'draft'}",
          "config.json")


# --- class 10: a used --out is refused before anything is loaded ------------------------

def test_prune_into_a_used_out_is_refused_first(run_dir, used_out):
  before = snapshot(used_out)
  _raises(lambda: prune_lib.prune_checkpoint(run_dir, "magnitude:0.5", used_out),
          f"--out={used_out}", "already holds a checkpoint", "fresh --out")
  assert snapshot(used_out) == before


def test_quantize_into_a_used_out_is_refused_first(run_dir, used_out):
  before = snapshot(used_out)
  _raises(lambda: quantize_lib.quantize_checkpoint(run_dir, used_out, "int8"),
          f"--out={used_out}", "already holds a checkpoint", "delete it")
  assert snapshot(used_out) == before


# --- the CLIs: exit 2, one line, no traceback, nothing written --------------------------

def _python(code: str, *args: str) -> subprocess.CompletedProcess:
  """A tiny main run through cli_lib.run (no model code imported: fast)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


PROLOGUE = ("from absl import flags\nfrom scripts import cli_lib\n"
            "flags.DEFINE_integer('n', 1, 'a flag')\n")


def test_cli_os_error_unknown_flag_and_stray_argument():
  assert_refused(_python(PROLOGUE + "cli_lib.run(lambda: open('/no/such/file'))"),
                 "/no/such/file", "No such file")
  assert_refused(_python(PROLOGUE + "cli_lib.run(lambda: None)", "--nn=3"), "--nn")
  assert_refused(_python(PROLOGUE + "cli_lib.run(lambda: None)", "--n=x"), "--n=x")
  assert_refused(_python(PROLOGUE + "cli_lib.run(lambda: None)", "stray"), "stray")


def test_cli_unknown_config_override_key(tmp_path):
  """The issue's case, on the real trainer: the AttributeError names no flag today."""
  workdir = tmp_path / "w"
  proc = run_cli("scripts.train", "--config=scripts/configs/train/lm.py:tiny",
                 "--config.train.stepz=10", f"--workdir={workdir}")
  assert_refused(proc, "--config.train.stepz", "stepz", '"steps"')
  assert not workdir.exists()


CONFIG_MAIN = ("from ml_collections import config_flags\nfrom scripts import cli_lib\n"
               "c = config_flags.DEFINE_config_file('config', None, 'cfg', lock_config=True)\n"
               "cli_lib.run(lambda: print(c.value.train.steps))\n")


@pytest.mark.parametrize("args, names", [
    (["--config.trainz.steps=10"], ["--config.trainz.steps", "trainz", '"train"']),
    (["--config.train.steps=abc"], ["--config.train.steps=abc"]),
    (["--config.train.steps.x=1"], ["--config.train.steps.x"]),
])
def test_cli_bad_config_override(tmp_path, args, names):
  cfg = _write(tmp_path / "cfg.py", "import ml_collections\ndef get_config():\n"
               "  return ml_collections.ConfigDict({'train': {'steps': 1}})\n")
  assert_refused(_python(CONFIG_MAIN, f"--config={cfg}", *args), *names)


@pytest.mark.parametrize("text, names", [(None, ["No such file"]), ("def get_config(:\n",
                                                                    ["line 1"])])
def test_cli_config_file_that_does_not_load(tmp_path, text, names):
  cfg = str(tmp_path / "cfg.py")
  if text is not None:
    _write(cfg, text)
  assert_refused(_python(CONFIG_MAIN, f"--config={cfg}"), f"--config={cfg}", *names)


def test_cli_generate_junk_model_config(tmp_path):
  path = _write(tmp_path / "m" / "config.json", JUNK)
  line = assert_refused(run_cli("scripts.generate", f"--model={tmp_path / 'm'}", "--prompt=hi",
                                f"--output={tmp_path / 'o.json'}"),
                        f"--model={tmp_path / 'm'}", path, "not valid JSON")
  assert "--workdir" not in line and not (tmp_path / "o.json").exists()


def test_cli_generate_junk_tokenizer(run_dir, tmp_path):
  d = tmp_path / "run"
  shutil.copytree(run_dir, d)
  tok = _write(d / convert_lib.HF_SUBDIR / "tokenizer.json", "{junk")
  assert_refused(run_cli("scripts.generate", f"--model={d}", "--prompt=hi"),
                 f"--model={d}", tok)


def test_cli_generate_speculative_flag_without_the_method(tmp_path):
  proc = run_cli("scripts.generate", "--preset=test", "--prompt=hi", "--gamma=3",
                 f"--output={tmp_path / 'o.json'}")
  assert_refused(proc, "--gamma", "--method=speculative")
  assert not (tmp_path / "o.json").exists()


def test_cli_convert_junk_hf_dir(tmp_path):
  path = _write(tmp_path / "hf" / "config.json", JUNK)
  proc = run_cli("scripts.convert", "--to=sparq", f"--hf_dir={tmp_path / 'hf'}",
                 f"--workdir={tmp_path / 'w'}")
  assert_refused(proc, f"--hf_dir={tmp_path / 'hf'}", path)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module, flag", [("scripts.prune", "--prune=magnitude:0.5"),
                                          ("scripts.quantize", "--quant=int8")])
def test_cli_into_a_used_out(run_dir, used_out, module, flag):
  before = snapshot(used_out)
  proc = run_cli(module, f"--workdir={run_dir}", flag, f"--out={used_out}")
  assert_refused(proc, f"--out={used_out}", "already holds a checkpoint")
  assert proc.stderr.strip().count("\n") == 0, proc.stderr  # the error line only
  assert snapshot(used_out) == before


def test_cli_quantize_logs_no_info_lines(run_dir, tmp_path):
  proc = run_cli("scripts.quantize", f"--workdir={run_dir}", "--quant=int8",
                 f"--out={tmp_path / 'q'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.strip() == "", proc.stderr[-3000:]
