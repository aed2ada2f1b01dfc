r"""Generates text: python -m scripts.generate --model=DIR --prompt="def main(" [flags].

DIR: a sparq checkpoint workdir or a Hugging Face dir; --preset=NAME: random weights.
--method=sample (temperature 0 = greedy), beam or speculative (--draft=DIR, or exit:K with
scripts/train_early_exit.py's head). One prompt streams; repeat --prompt for a batch.
--kv_quant / --attn_qk / --attn_select / --evict: KV-cache codes, int8 Q.K^T, block-sparse
attention, a fixed per-head KV budget (H2O / SnapKV / StreamingLLM).
"""

from absl import flags

from scripts import cli_lib, generate_lib

flags.DEFINE_string("model", None, "Checkpoint workdir or Hugging Face model dir.")
flags.DEFINE_string("preset", None, "Random weights for a model preset instead.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("tokenizer", "auto", "'auto' (the dir's tokenizer.json), 'byte' or a path.")
flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
flags.DEFINE_string("method", "sample", "Decoding method: sample | beam | speculative.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus mass in (0, 1] (1 = off).")
flags.DEFINE_float("min_p", 0.0, "Keep p >= min_p * max p (0 = off).")
flags.DEFINE_float("repetition_penalty", 1.0, "Penalty on seen tokens (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed (row i uses fold_in(seed, i)).")
flags.DEFINE_multi_string("stop", [], "Stop string; repeat for several.")
flags.DEFINE_integer("beam_width", 4, "Beam width (--method=beam).")
flags.DEFINE_float("length_penalty", 1.0, "Beam score = logprob / length**penalty.")
flags.DEFINE_integer("num_return", 1, "Hypotheses printed per prompt (beam).")
flags.DEFINE_string("draft", None, "Speculative draft: a checkpoint / HF dir, or exit:K.")
flags.DEFINE_integer("gamma", 4, "Speculative: tokens drafted per round.")
flags.DEFINE_integer("gamma_max", None, "Speculative: adaptive cap (default gamma, 2*gamma).")
flags.DEFINE_string("schedule", "fixed", "Speculative gamma: fixed | heuristic.")
flags.DEFINE_string("kv_quant", None, "KV-cache codes: int8 | int4 | fp8 (default: float).")
flags.DEFINE_string("attn_qk", None, "int8: smoothed int8 Q.K^T (needs --kv_quant=int8).")
flags.DEFINE_string("attn_select", None, "Block selector: topk:k=8:block=64 (parse_selector).")
flags.DEFINE_string("evict", None, "Per-head KV budget: h2o:budget=256 (sparsity.parse_policy).")
flags.DEFINE_bool("stream", True, "Stream tokens to stdout (single prompt, sample).")
flags.DEFINE_string("output", None, "Write the results as JSON here.")


def main():
  values = flags.FLAGS.flag_values_dict()
  present = [n for n in values if flags.FLAGS[n].present]
  print(generate_lib.generate_from_flags(values, present))


if __name__ == "__main__":
  cli_lib.run(main)
