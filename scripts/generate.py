r"""Generates text: python -m scripts.generate --model=DIR --prompt="def main(" [flags].

DIR is a sparq checkpoint workdir (scripts/train.py, prune, quantize, convert) or
a Hugging Face model dir; --preset=NAME uses random weights instead (a smoke test).
--method=sample (temperature 0 = greedy, the default), beam, or speculative
(--draft=DIR: a smaller model with the same tokenizer, e.g. from
scripts/configs/draft.py; or --draft=exit:K: the target's first K layers and
its early-exit head from scripts/train_early_exit.py). Tokens stream to stdout
for a single prompt with --method=sample; --output writes every result (text,
tokens, finish reason, cost, speculative stats) as JSON. Repeat --prompt for a
batch.

  python -m scripts.generate --preset=test --prompt="hello" --max_new_tokens=16
  python -m scripts.generate --model=runs/main/float --prompt="import os" \
      --temperature=0.8 --top_p=0.95 --stop=$'\n\n'
  python -m scripts.generate --model=runs/main/float --prompt="def f(" --method=beam \
      --beam_width=4 --num_return=2
  python -m scripts.generate --model=runs/spec_target --draft=runs/spec_draft \
      --method=speculative --gamma=4 --schedule=heuristic --prompt="import os"
"""

import json

from absl import app, flags, logging

from scripts import generate_lib

_MODEL = flags.DEFINE_string("model", None, "Checkpoint workdir or Hugging Face model dir.")
_PRESET = flags.DEFINE_string("preset", None, "Random weights for a model preset instead.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "auto",
                                 "'auto' (the dir's tokenizer.json, else bytes), 'byte' or a path.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
_METHOD = flags.DEFINE_string("method", "sample", "Decoding method: sample | beam | speculative.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass in (0, 1] (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Keep p >= min_p * max p (0 = off).")
_REP = flags.DEFINE_float("repetition_penalty", 1.0, "Penalty on seen tokens (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (row i uses fold_in(seed, i)).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string; repeat for several.")
_BEAM = flags.DEFINE_integer("beam_width", 4, "Beam width (--method=beam).")
_LP = flags.DEFINE_float("length_penalty", 1.0, "Beam score = logprob / length**penalty.")
_NUM_RETURN = flags.DEFINE_integer("num_return", 1, "Hypotheses printed per prompt (beam).")
_DRAFT = flags.DEFINE_string("draft", None,
                             "Speculative draft: a checkpoint / HF dir, or exit:K (early exit).")
_GAMMA = flags.DEFINE_integer("gamma", 4, "Speculative: tokens drafted per round.")
_GAMMA_MAX = flags.DEFINE_integer("gamma_max", None,
                                  "Speculative: adaptive cap (default gamma, 2*gamma adaptive).")
_SCHEDULE = flags.DEFINE_string("schedule", "fixed", "Speculative gamma: fixed | heuristic.")
_STREAM = flags.DEFINE_bool("stream", True, "Stream tokens to stdout (single prompt, sample).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")


def _extra() -> dict:
  if _METHOD.value != "speculative":
    return {}
  extra = dict(draft=_DRAFT.value, gamma=_GAMMA.value, schedule=_SCHEDULE.value)
  if _GAMMA_MAX.value is not None:
    extra["gamma_max"] = _GAMMA_MAX.value
  return extra


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  texts = list(_PROMPT.value)
  stream = _STREAM.value and len(texts) == 1 and _METHOD.value == "sample"
  opts = generate_lib.Options(
      max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, min_p=_MIN_P.value, repetition_penalty=_REP.value, seed=_SEED.value,
      stop=tuple(_STOP.value), beam_width=_BEAM.value, length_penalty=_LP.value,
      num_return=_NUM_RETURN.value, stream=stream, extra=_extra())
  try:
    generate_lib.validate(_METHOD.value, opts, texts)
    run = generate_lib.load(_MODEL.value, preset=_PRESET.value, step=_STEP.value,
                            tokenizer=_TOKENIZER.value, seed=_SEED.value)
    if stream:
      print(texts[0], end="", flush=True)
    results = generate_lib.generate_text(run, texts, _METHOD.value, opts)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  if not stream:
    for text, r in zip(texts, results, strict=True):
      hyps = r.get("hypotheses", [r])
      for j, h in enumerate(hyps):
        tag = f" [{j}] score={h['score']:.3f}" if "score" in h else ""
        print(f"--- prompt: {text!r}{tag}\n{text}{h['text']}")
  if "stats" in results[0]:
    st = results[0]["stats"]
    print(f"--- speculative: alpha {st['alpha']:.3f}, {st['tokens_per_call']:.2f} tokens per "
          f"target call, mean gamma {st['mean_gamma']:.2f}")
  cost = results[0]["cost"]
  print(f"--- {cost['tokens']} tokens in {cost['wall_time_s']:.2f}s "
        f"({cost['tokens'] / max(cost['wall_time_s'], 1e-9):.1f} tok/s incl. compile), "
        f"{cost['forward_passes']} forward passes")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
