"""Bad inputs through the Python API: each is one ValueError line naming the argument and value.

Covered (issue 17, class 4 and the quant part of class 9):
  - token ids outside [0, vocab) or of a non-integer dtype, at every public decoding edge
    (`generate`, `beam_search`, `speculative_generate`, `self_speculative_decode`,
    `sample_shared_prefix`, `prefill_prefix`, the learned reward model's `value_features`)
    and at the forward pass (`model.apply`, `model.hidden_states`, a `Decoder` /
    `ExitDecoder` step): prompt ids >= vocab, negative, past int32 (they would wrap), float
    prompts, and out-of-vocab `pad_id`, `eos_id` and `stop_sequences` ids;
  - conflicting quant recipe options (`int8:g64:g32`, `channel:tensor`, `g128:tensor`,
    `sym:asym`, `rtn:gptq`, two `clip=` / `alpha=`), also inside `rules=` and as a
    `QuantSpec`;
  - non-finite weights given to `quant.quantize`, `quantize_tensor`, `matryoshka_quantize`
    and `gptq_layer` (refused, naming the first bad leaf, instead of silent code 0).
Each decoding refusal happens before the model is called once. Positive controls: ids 0
and vocab - 1, an in-range pad / EOS id, a repeated identical recipe option, finite params
quantize, and a jitted forward over traced tokens still compiles (the id check skips
tracers, so jitted callers pay nothing).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import model
import quant
from decoding.search import reward
from model.tree import NonFiniteError
from tests.reliability.harness import assert_one_line

CFG = model.get_preset("test")
V = CFG.vocab_size
DEC = model.Decoder(CFG)
VALID = f"[0, {V})"


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


def _gen(p, prompts=((1, 2, 3),), **kw):
  return decoding.generate(p, [list(r) for r in prompts], DEC, max_new_tokens=2, **kw)


def _spec(p, prompts, **kw):
  return decoding.speculative_generate(p, p, prompts, target_step_fn=DEC, draft_step_fn=DEC,
                                       max_new_tokens=2, **kw)


def _with(p, path, index, value):
  """A copy of params with one entry of the leaf at `path` set to `value`."""
  leaf = model.tree.get_path(p, path)
  return model.tree.replace_path(p, path, leaf.at[index].set(value))


ID_CASES = [  # (call, names the one-line message must contain)
    pytest.param(lambda p: _gen(p, [[1, 2, V]]), ("prompt_tokens", str(V), "[0, 2]", VALID),
                 id="generate-id-vocab"),
    pytest.param(lambda p: _gen(p, [[1, -1, 2]]), ("prompt_tokens", "-1", "[0, 1]", VALID),
                 id="generate-id-negative"),
    pytest.param(lambda p: _gen(p, [[3], [1, 2 ** 40]]), ("prompt_tokens", str(2 ** 40),
                                                         "[1, 1]"), id="generate-id-past-int32"),
    pytest.param(lambda p: decoding.generate(p, np.array([[4, 300, 0]]), DEC, max_new_tokens=2,
                                             prompt_lengths=[3]),
                 ("prompt_tokens", "300", "[0, 1]"), id="generate-array-id"),
    pytest.param(lambda p: _gen(p, [[1.5, 2.0]]), ("prompt_tokens", "float"),
                 id="generate-float-prompt"),
    pytest.param(lambda p: decoding.generate(p, np.array([[1.0, 2.0]]), DEC, max_new_tokens=2),
                 ("prompt_tokens", "float"), id="generate-float-array"),
    pytest.param(lambda p: _gen(p, pad_id=-3), ("pad_id=-3", VALID), id="generate-pad-neg"),
    pytest.param(lambda p: _gen(p, pad_id=V), (f"pad_id={V}", VALID), id="generate-pad-vocab"),
    pytest.param(lambda p: _gen(p, pad_id=True), ("pad_id=True",), id="generate-pad-bool"),
    pytest.param(lambda p: _gen(p, pad_id=1.5), ("pad_id=1.5",), id="generate-pad-float"),
    pytest.param(lambda p: _gen(p, eos_id=V + 1), (f"eos_id={V + 1}", VALID),
                 id="generate-eos-vocab"),
    pytest.param(lambda p: _gen(p, eos_id=-1), ("eos_id=-1", VALID), id="generate-eos-neg"),
    pytest.param(lambda p: _gen(p, eos_id=[3, 999]), ("eos_id", "999", "[1]"),
                 id="generate-eos-list"),
    pytest.param(lambda p: _gen(p, stop_sequences=[[1], [2, V]]),
                 ("stop_sequences[1]", str(V), "[1]"), id="generate-stop-vocab"),
    pytest.param(lambda p: _gen(p, stop_sequences=[[-5]]), ("stop_sequences[0]", "-5"),
                 id="generate-stop-neg"),
    pytest.param(lambda p: _gen(p, stop_sequences=[7, 8]), ("stop_sequences[0]=7",),
                 id="generate-stop-flat"),
    pytest.param(lambda p: decoding.beam_search(p, [[1, V + 7]], DEC, beam_width=2,
                                                max_new_tokens=2),
                 ("prompt_tokens", str(V + 7)), id="beam-id"),
    pytest.param(lambda p: decoding.beam_search(p, [[1, 2]], DEC, beam_width=2,
                                                max_new_tokens=2, pad_id=V),
                 (f"pad_id={V}",), id="beam-pad"),
    pytest.param(lambda p: _spec(p, [[1, -4]]), ("prompt_tokens", "-4"), id="speculative-id"),
    pytest.param(lambda p: _spec(p, [[1, 2]], eos_id=V), (f"eos_id={V}",),
                 id="speculative-eos"),
    pytest.param(lambda p: decoding.self_speculative_decode(CFG, p, 1, [[V]],
                                                            max_new_tokens=2),
                 ("prompt_tokens", str(V)), id="self-speculative-id"),
    pytest.param(lambda p: decoding.sample_shared_prefix(CFG, p, [1, V], 2, max_new_tokens=2),
                 ("prefix_tokens", str(V), "[1]"), id="shared-prefix-id"),
    pytest.param(lambda p: decoding.sample_shared_prefix(CFG, p, [1, 2], 2, max_new_tokens=2,
                                                         pad_id=-1),
                 ("pad_id=-1",), id="shared-prefix-pad"),
    pytest.param(lambda p: decoding.prefill_prefix(CFG, p, [1.0, 2.0]),
                 ("prefix_tokens", "float"), id="prefill-prefix-float"),
    pytest.param(lambda p: reward.value_features(CFG, p, [[1, 2], [V]]),
                 ("token_rows[1]", str(V)), id="value-features-id"),
    pytest.param(lambda p: model.apply(CFG, p, jnp.array([[1, V]])),
                 ("tokens_BT", str(V), "[0, 1]", VALID), id="apply-id-vocab"),
    pytest.param(lambda p: model.apply(CFG, p, jnp.array([[-2, 1]])),
                 ("tokens_BT", "-2", "[0, 0]"), id="apply-id-negative"),
    pytest.param(lambda p: model.apply(CFG, p, jnp.array([[1.0, 2.0]])),
                 ("tokens_BT", "float32"), id="apply-float"),
    pytest.param(lambda p: model.apply(CFG, p, jnp.array([1, 2])), ("tokens_BT", "[B, T]"),
                 id="apply-rank-1"),
    pytest.param(lambda p: model.hidden_states(CFG, p, np.array([[3, V + 2]]), n_layers=1),
                 ("tokens_BT", str(V + 2)), id="hidden-states-id"),
    pytest.param(lambda p: DEC(p, jnp.array([[V]]), DEC.init_cache(1, 16)),
                 ("tokens_BT", str(V)), id="decoder-step-id"),
    pytest.param(lambda p: decoding.ExitDecoder(CFG, exit_layer=1)(
        p, jnp.array([[-1]]), DEC.init_cache(1, 16)), ("tokens_BT", "-1"),
        id="exit-decoder-step-id"),
]

QUANT_CASES = [
    pytest.param(lambda p: quant.parse_recipe("int8:g64:g32"), ("int8:g64:g32", "'g64'", "'g32'"),
                 id="recipe-two-groups"),
    pytest.param(lambda p: quant.parse_recipe("int8:channel:tensor"),
                 ("int8:channel:tensor", "'channel'", "'tensor'"), id="recipe-channel-tensor"),
    pytest.param(lambda p: quant.parse_recipe("int4:g128:tensor"),
                 ("int4:g128:tensor", "'g128'", "'tensor'"), id="recipe-group-tensor"),
    pytest.param(lambda p: quant.parse_recipe("int8:sym:asym"),
                 ("int8:sym:asym", "'sym'", "'asym'"), id="recipe-sym-asym"),
    pytest.param(lambda p: quant.parse_recipe("int4:g32:rtn:gptq"),
                 ("int4:g32:rtn:gptq", "'rtn'", "'gptq'"), id="recipe-two-methods"),
    pytest.param(lambda p: quant.parse_recipe("int8:clip=mse:clip=p99"),
                 ("'clip=mse'", "'clip=p99'"), id="recipe-two-clips"),
    pytest.param(lambda p: quant.parse_recipe("w8a8:smoothquant:alpha=0.3:alpha=0.4"),
                 ("'alpha=0.3'", "'alpha=0.4'"), id="recipe-two-alphas"),
    pytest.param(lambda p: quant.quantize(p, "int8", rules=[("mlp", "int4:asym:sym")]),
                 ("int4:asym:sym", "'asym'", "'sym'"), id="rule-recipe-conflict"),
    pytest.param(lambda p: quant.QuantSpec(group_size=64, granularity="tensor"),
                 ("group_size=64", "granularity='tensor'"), id="quantspec-group-tensor"),
]

NONFINITE_CASES = [
    pytest.param(lambda p: quant.quantize(_with(p, "layers_1/mlp/up/kernel", (0, 3), jnp.nan),
                                          "int8"),
                 ("quant.quantize", "'layers_1/mlp/up/kernel'", "NaN"), id="quantize-nan"),
    pytest.param(lambda p: quant.quantize(_with(p, "final_norm/scale", 0, jnp.inf), "int4:g32"),
                 ("quant.quantize", "'final_norm/scale'"), id="quantize-inf-norm"),
    pytest.param(lambda p: quant.quantize_tensor(jnp.array([[1.0, jnp.nan]])),
                 ("quantize_tensor", "w", "1 non-finite"), id="quantize-tensor-nan"),
    pytest.param(lambda p: quant.matryoshka_quantize(
        _with(p, "layers_0/attn/q/kernel", (1, 1), -jnp.inf), 4),
        ("matryoshka_quantize", "'layers_0/attn/q/kernel'"), id="matryoshka-inf"),
    pytest.param(lambda p: quant.gptq_layer(jnp.full((8, 4), jnp.nan), jnp.eye(8), bits=4),
                 ("kernel", "NaN"), id="gptq-layer-nan"),
]


@pytest.mark.parametrize("call,names", ID_CASES + QUANT_CASES)
def test_refused_in_one_line(params, call, names):
  with pytest.raises(ValueError) as e:
    call(params)
  assert_one_line(str(e.value), *names)


@pytest.mark.parametrize("call,names", NONFINITE_CASES)
def test_nonfinite_weights_refused(params, call, names):
  with pytest.raises(ValueError) as e:  # NonFiniteError where the tree helper raises it
    call(params)
  assert_one_line(str(e.value), *names)
  if "quantize" in names[0]:
    assert isinstance(e.value, NonFiniteError)


CALLS = [0]


@dataclasses.dataclass(frozen=True)
class _Counting(model.Decoder):
  """A Decoder that counts its calls (traces included): a refused request makes none."""

  def __call__(self, params, tokens_BT, cache):
    CALLS[0] += 1
    return super().__call__(params, tokens_BT, cache)


@pytest.mark.parametrize("kw", [dict(prompts=[[1, V]]), dict(pad_id=V), dict(eos_id=-2),
                                dict(stop_sequences=[[V]])], ids=["prompt", "pad", "eos", "stop"])
def test_refused_before_any_compute(params, kw):
  step = _Counting(CFG)
  kw = dict(kw)
  prompts = kw.pop("prompts", [[1, 2]])
  runs = [lambda: decoding.generate(params, prompts, step, max_new_tokens=2, **kw),
          lambda: decoding.speculative_generate(params, params, prompts, target_step_fn=step,
                                                draft_step_fn=step, max_new_tokens=2, **kw)]
  if "stop_sequences" not in kw:  # beam search takes no stop sequences
    runs.append(lambda: decoding.beam_search(params, prompts, step, beam_width=2,
                                             max_new_tokens=2, **kw))
  CALLS[0] = 0
  for run in runs:
    with pytest.raises(ValueError):
      run()
  assert CALLS[0] == 0


def test_boundary_ids_decode(params):
  """Ids 0 and vocab - 1, pad_id = vocab - 1 and an EOS id of 0 are all valid."""
  out = decoding.generate(params, [[0, V - 1], [V - 1]], DEC, max_new_tokens=3, pad_id=V - 1,
                          eos_id=0, stop_sequences=[[V - 1, 0]])
  toks = np.asarray(out.tokens)
  assert toks.shape == (2, 3) and ((0 <= toks) & (toks < V)).all()
  assert np.isfinite(np.asarray(out.logprobs)).all()


def test_boundary_ids_forward(params):
  logits, _ = model.apply(CFG, params, np.array([[0, V - 1, 5]], np.int32))
  assert logits.shape == (1, 3, V) and bool(jnp.all(jnp.isfinite(logits)))


def test_jitted_forward_with_traced_tokens_compiles(params):
  """Under jit the values are unknown: the check is skipped, so jitted callers still compile
  (and pay nothing); the dtype is still checked at trace time."""
  fwd = jax.jit(lambda p, t: model.apply(CFG, p, t)[0])
  assert fwd(params, jnp.array([[0, V - 1]])).shape == (1, 2, V)
  assert jax.eval_shape(fwd, params, jax.ShapeDtypeStruct((2, 4), jnp.int32)).shape == (2, 4, V)
  with pytest.raises(ValueError, match="tokens_BT must hold integer token ids"):
    jax.eval_shape(fwd, params, jax.ShapeDtypeStruct((2, 4), jnp.float32))


def test_repeated_identical_option_and_canonical_names_parse():
  assert quant.parse_recipe("int8:sym:sym") == quant.parse_recipe("int8")
  for r in ("int4:g128:asym:clip=mse", "int8:tensor", "w8a8:smoothquant:alpha=0.3"):
    spec = quant.parse_recipe(r)
    assert quant.parse_recipe(spec.name) == spec


def test_finite_params_quantize(params):
  q, report = quant.quantize(params, "int8")
  assert report["n_quantized"] > 0 and np.isfinite(report["max_rel_fro_err"])
