r"""python -m scripts.attention_eval --config=scripts/configs/sweeps/attention.py --workdir=OUT

Pruned attention on long-context retrieval (`scripts.attention_eval_lib`): trains the
retrieval model of scripts/configs/train/retrieval.py (passkey at CONTEXT bytes, default
512; resumable, in OUT/model), then greedily decodes held-out problems with dense
attention, every block selector below (Quest top-k, HiP, SALE) and every KV eviction
policy x budget (StreamingLLM, H2O, SnapKV); records accuracy, held-out bits/byte, and
the selectors' density and recall of the true attention on the model's own queries and
keys. Writes docs/attention_eval.{json,md} and PNG curves (accuracy vs KV budget, vs
density; recall vs density). Arg: [TASK,]CONTEXT as in retrieval.py, or "smoke".
"""

import ml_collections

from scripts.configs.train import retrieval as retrieval_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.retrieval = retrieval_config.get_config(arg)
  c.retrieval.unlock()
  ctx = c.retrieval.task.context_len
  block = 16 if smoke else 32  # 16 kv blocks at context 512
  c.selectors = [f"topk:k={k}:block={block}" for k in ((1,) if smoke else (1, 2, 4, 8))]
  c.selectors += [f"hip:k={k}:block={block}" for k in ((1,) if smoke else (1, 2, 4, 8))]
  c.selectors += [f"sale:tau={t}:max_blocks=8:block={block}"
                  for t in ((0.1,) if smoke else (0.3, 0.1, 0.03, 0.01))]
  budgets = [48] if smoke else [d for d in (48, 64, 96, 128, 192, 256, 384) if d < ctx]
  c.eviction = ml_collections.ConfigDict(dict(
      policies=["streamingllm", "h2o", "snapkv"], budgets=budgets))
  c.window = ml_collections.ConfigDict(dict(window=4 * block, sinks=4, block=block))
  c.n_problems = 8 if smoke else 200  # held-out problems per row
  c.probe_problems = 2 if smoke else 16  # prompts of the recall / density pass
  c.bpb_texts = 4 if smoke else 16
  c.topk_recall_k = 4  # top-k blocks for the recall of selectors without a k
  c.batch_size = 8 if smoke else 50
  c.output_dir = ""  # "": the workdir; the committed results use --config.output_dir=docs
  c.lock()
  return c
