r"""Trains the early-exit head of a trained target for self-speculative decoding.

python -m scripts.train_early_exit --target_workdir=runs/spec_target --exit_layer=1 \
    --workdir=runs/spec_exit

The target is frozen; the head (h + h @ W, an RMSNorm, the shared LM head after
layer k) is distilled towards the target's next-token distribution (KL) on the
target's corpus, through the one trainer (resumable, metrics.jsonl, TensorBoard).
`--method=speculative --draft=exit:K` and scripts/bench/speculative.py load it.
"""

from absl import flags

from scripts import cli_lib, early_exit_lib

_TARGET = flags.DEFINE_string("target_workdir", None, "Workdir of the trained target.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder for target + exit head.")
_EXIT = flags.DEFINE_integer("exit_layer", 1, "Layers the draft runs (1 .. n_layers - 1).")
_STEPS = flags.DEFINE_integer("steps", 150, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_LR = flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.mark_flags_as_required(["target_workdir", "workdir"])


def main():
  early_exit_lib.train_exit_head(_TARGET.value, _WORKDIR.value, exit_layer=_EXIT.value,
                                 steps=_STEPS.value, batch_size=_BATCH.value,
                                 seq_len=_SEQ.value, lr=_LR.value)


if __name__ == "__main__":
  cli_lib.run(main)
