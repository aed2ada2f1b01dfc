"""The main job on a few steps: every stage reports, speculative == greedy, a rerun resumes."""

import json
import os

from scripts import main_job_lib
from scripts.configs import main_job


def _config():
  c = main_job.get_config("0.005")  # a few steps per stage
  c.unlock()
  c.model.preset = "test"
  c.model.n_layers = 2
  c.data.seq_len, c.data.batch_size = 32, 4
  c.train.update(eval_every=0, eval_batches=1, log_every=1)
  c.eval.max_batches = 1
  c.decode.update(max_new_tokens=6, num_samples=2)
  c.prune.update(recipes=["magnitude:0.5", "wanda:2:4", "sparsegpt:0.5"], finetune=["wanda:2:4"],
                 calib_seqs=4)
  c.quant.update(methods=["int4:g32:gptq", "w8a8:smoothquant"], qat_steps=2)
  # k = every block of the 32-token windows: the sparse rows must equal dense.
  c.attention.update(select="topk:k=4:block=8", windows=2, seq_len=32, prompt_len=24,
                     new_tokens=4)
  c.speculative.update(draft_steps=2, num_prompts=1, gamma=2)
  c.speculative.draft_model.update(d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
  c.search.update(policy_steps=2, corpus_lines=1600, budget=2, problems=2,
                  methods=("best_of_n", "beam_search:beam_width=2"))
  c.lock()
  return c


def test_main_job_reports_every_stage(tmp_path):
  config = _config()
  report = main_job_lib.run(config, str(tmp_path))
  # float, 3 one-shot, 1 fine-tuned, the shrunk model, int8, pruned + int8, GPTQ, W8A8, QAT.
  assert len(report["variants"]) == 11
  assert {"int4:g32:gptq", "w8a8:smoothquant", "qat"} <= set(report["quant"])
  assert report["prune"]["wanda:2:4"]["sparsity"] == 0.5
  for row in report["variants"].values():
    assert row["bpb"] > 0 and row["decode_tokens_per_s"] > 0
  sp = report["speculative"]
  assert sp["equals_greedy"] and 0.0 <= sp["alpha"] <= 1.0 and sp["tokens"] > 0
  assert sp["tokens_per_target_call"] >= 1.0 and sp["speedup"] > 0
  assert set(sp["calls_ms"]) == {"target_step", "target_verify", "draft_step"}
  assert all(v > 0 for v in sp["calls_ms"].values())
  at = report["attention"]
  assert abs(at["sparse_bpb"] - at["dense_bpb"]) < 1e-4 and at["kv_read_fraction"] == 1.0
  assert at["sparse_tokens"] == at["dense_tokens"] and at["same_prefix_tokens"] == 4
  with open(tmp_path / "report.json") as f:
    assert json.load(f)["speculative"]["gamma"] == 2
  assert os.path.isdir(tmp_path / "draft" / "checkpoints")
  text = main_job_lib.format_report(report, config)
  assert "speculative decoding" in text and "output == greedy: True" in text
  # A slowdown is labelled as such, never shown as a result.
  assert ("no speedup at this scale" in text) == (sp["speedup"] < 1)
  assert "sparse attention (topk:k=4:block=8" in text
  se = report["search"]
  assert set(se["methods"]) == {"one sample", "best_of_n", "beam_search:beam_width=2"}
  for r in se["methods"].values():
    assert 0 <= r["accuracy"] <= 1 and r["tokens"] > 0
  assert se["methods"]["best_of_n"]["reward_calls"] == 2
  assert "test-time search on arithmetic" in text
  # A second run on the same workdir resumes: no training left, derived checkpoints replaced.
  again = main_job_lib.run(config, str(tmp_path))
  assert again["train"]["step"] == report["train"]["step"]
  assert again["variants"]["float"]["bpb"] == report["variants"]["float"]["bpb"]
