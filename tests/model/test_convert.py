"""Hugging Face import / export: logits parity with transformers (the independent oracle)."""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import decoding  # noqa: E402
import model  # noqa: E402
import model.rope  # noqa: E402
from model import convert  # noqa: E402
from model.kv_cache import init_cache  # noqa: E402

pytestmark = pytest.mark.hf
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=0)
FAMILIES = {
    # GQA with 4 query heads per kv head, odd vocab, llama3 RoPE scaling, head_dim 16 != 64 / 8.
    "llama3_untied": ("LlamaForCausalLM", dict(
        vocab_size=101, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        rope_scaling=LLAMA3_ROPE, rope_theta=500_000.0, tie_word_embeddings=False)),
    # Llama 3.2-1B / SmolLM style: tied embeddings, linear scaling, MHA.
    "llama_tied": ("LlamaForCausalLM", dict(
        vocab_size=97, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralForCausalLM", dict(
        vocab_size=99, num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
        rope_theta=1e6)),
    "qwen2": ("Qwen2ForCausalLM", dict(
        vocab_size=103, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(
        vocab_size=89, num_attention_heads=8, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=False)),
}
B, T_PROMPT, T_FULL, N_NEW = 2, 10, 16, 32
LENS = np.array([T_FULL, 9])


def _hf_model(arch: str, kw: dict, seed: int = 0):
  config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
  torch.manual_seed(seed)
  m = getattr(transformers, arch)(config_cls(**_COMMON, **kw)).eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so they count
    for name, p in m.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape))
      else:
        p.copy_(0.2 * torch.randn(p.shape))
  return m


@dataclasses.dataclass
class Family:
  name: str
  hf: object
  path: str
  cfg: model.ModelConfig
  params: dict
  forward: object
  step: object


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request, tmp_path_factory):
  arch, kw = FAMILIES[request.param]
  hf = _hf_model(arch, kw)
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path, safe_serialization=True)
  cfg, params = convert.load_hf(path, param_dtype="float32")
  # Padding is segment 0: real tokens (segment 1) never attend to it.
  forward = jax.jit(lambda p, t, pos, valid: model.apply(cfg, p, t, positions=pos,
                                                         segment_ids=valid.astype(int))[0])
  step = jax.jit(lambda p, t, c: model.apply(cfg, p, t, cache=c))
  return Family(request.param, hf, path, cfg, params, forward, step)


def _hf_logits(m, tokens, mask=None, positions=None):
  with torch.no_grad():
    out = m(torch.tensor(tokens), attention_mask=None if mask is None else torch.tensor(mask),
            position_ids=None if positions is None else torch.tensor(positions))
  return out.logits.float().numpy()


def _tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(1, vocab, shape)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers_with_padding(fam, side):
  toks = _tokens(fam.cfg.vocab_size, (B, T_FULL))
  idx = np.arange(T_FULL)[None]
  valid = idx < LENS[:, None] if side == "right" else idx >= T_FULL - LENS[:, None]
  toks = np.where(valid, toks, 0)
  # HF's generate derives positions from the mask this way; forward takes them explicitly.
  pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  ref = _hf_logits(fam.hf, toks, valid.astype(np.int64), pos)
  ours = np.asarray(fam.forward(fam.params, toks, pos, valid))
  err = np.abs(ours - ref)[valid].max()
  print(f"\n{fam.name}: max |logit diff| vs transformers, {side} padding: {err:.2e}")
  assert err <= 1e-4
  assert np.abs(ref[valid]).max() > 1.0  # logits are not trivially small


def test_kv_cache_prefill_and_steps_match_transformers(fam):
  toks = _tokens(fam.cfg.vocab_size, (B, T_FULL), seed=1)
  ref = _hf_logits(fam.hf, toks)
  cache = init_cache(fam.cfg, B, T_PROMPT + N_NEW)
  logits, cache = fam.step(fam.params, jnp.asarray(toks[:, :T_PROMPT]), cache)
  got = [np.asarray(logits)]
  for t in range(T_PROMPT, T_FULL):
    logits, cache = fam.step(fam.params, jnp.asarray(toks[:, t:t + 1]), cache)
    got.append(np.asarray(logits))
  err = np.abs(np.concatenate(got, axis=1) - ref).max()
  print(f"\n{fam.name}: max |logit diff| vs transformers, KV cache: {err:.2e}")
  assert err <= 1e-4


def _greedy(fam, right_padded, lens):
  """Greedy decoding over the KV cache: ragged prompts prefilled right-padded."""
  cache = init_cache(fam.cfg, B, T_PROMPT + N_NEW)
  logits, cache = fam.step(fam.params, jnp.asarray(right_padded), cache)
  cache = cache.replace(lengths=jnp.asarray(lens, jnp.int32))
  nxt = jnp.argmax(logits[jnp.arange(B), lens - 1], axis=-1)
  out = [nxt]
  for _ in range(N_NEW - 1):
    logits, cache = fam.step(fam.params, nxt[:, None], cache)
    nxt = jnp.argmax(logits[:, 0], axis=-1)
    out.append(nxt)
  return np.stack([np.asarray(o) for o in out], axis=1)


def _hf_greedy(fam, toks, lens):
  """transformers' generate on the same prompts, left-padded as HF expects."""
  left = np.zeros_like(toks)
  for b, n in enumerate(lens):
    left[b, T_PROMPT - n:] = toks[b, :n]
  mask = np.arange(T_PROMPT)[None] >= T_PROMPT - lens[:, None]
  with torch.no_grad():
    out = fam.hf.generate(torch.tensor(left), attention_mask=torch.tensor(mask.astype(int)),
                          max_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
  assert out.shape == (B, T_PROMPT + N_NEW)
  return out[:, T_PROMPT:].numpy()


def test_greedy_tokens_match_transformers_generate(fam):
  lens = np.array([T_PROMPT, 6])
  toks = _tokens(fam.cfg.vocab_size, (B, T_PROMPT), seed=2)
  right = np.where(np.arange(T_PROMPT)[None] < lens[:, None], toks, 0)
  np.testing.assert_array_equal(_greedy(fam, right, lens), _hf_greedy(fam, toks, lens))


@pytest.mark.parametrize("fam", ["qwen3"], indirect=True)  # one family: slow to compile
def test_decoding_generate_matches_transformers(fam):
  lens = np.array([T_PROMPT, 6])
  toks = _tokens(fam.cfg.vocab_size, (B, T_PROMPT), seed=4)
  out = decoding.generate(fam.params, [list(r[:n]) for r, n in zip(toks, lens)],
                          model.Decoder(fam.cfg), max_new_tokens=N_NEW)
  np.testing.assert_array_equal(np.asarray(out.tokens), _hf_greedy(fam, toks, lens))


def test_export_then_transformers_and_reimport_are_exact(fam, tmp_path):
  arch = fam.hf.config.architectures[0]
  assert convert.export_hf(fam.cfg, fam.params, str(tmp_path), architecture=arch) == arch
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(reloaded).__name__ == arch
  toks = _tokens(fam.cfg.vocab_size, (B, T_FULL), seed=3)
  np.testing.assert_array_equal(_hf_logits(reloaded, toks), _hf_logits(fam.hf, toks))
  cfg2, params2 = convert.load_hf(str(tmp_path))
  assert cfg2 == fam.cfg
  jax.tree.map(np.testing.assert_array_equal, params2, fam.params)
  # The same tree as model.init's, so every params transform applies unchanged.
  assert jax.tree.structure(params2) == jax.tree.structure(model.param_shapes(cfg2))


def test_rope_frequencies_match_transformers_and_scaling_bites(fam):
  """The llama3 / linear scalings in FAMILIES change the frequencies, so parity tests them."""
  ours = model.rope.inv_frequencies(fam.cfg.dh, fam.cfg.rope_theta, fam.cfg.rope_scaling)
  theirs = fam.hf.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  if fam.cfg.rope_scaling is not None:
    plain = model.rope.inv_frequencies(fam.cfg.dh, fam.cfg.rope_theta, None)
    assert np.abs(ours / plain - 1).max() > 0.4


# ---- dtypes, shards, config mapping -------------------------------------------------------


@pytest.fixture(scope="module")
def small_hf():
  return _hf_model(*FAMILIES["qwen2"], seed=1)


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_import_exactly(small_hf, tmp_path, torch_dtype):
  m = copy.deepcopy(small_hf).to(getattr(torch, torch_dtype))
  m.save_pretrained(str(tmp_path), safe_serialization=True)
  cfg, params = convert.load_hf(str(tmp_path))  # default: the checkpoint's dtype
  assert cfg.param_dtype == torch_dtype
  q = params["layers_1"]["attn"]["q"]["kernel"]
  assert q.dtype == jnp.dtype(torch_dtype)
  want = m.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(q, np.float32), want)
  cfg32, params32 = convert.load_hf(str(tmp_path), param_dtype="float32")
  assert cfg32.param_dtype == "float32" and cfg32.dtype == "float32"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b),
               params, params32)
  out = tmp_path / "export"
  convert.export_hf(cfg, params, str(out))
  cfg2, params2 = convert.load_hf(str(out))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoints_both_ways(small_hf, tmp_path):
  small_hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True, max_shard_size="40KB")
  assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
  cfg, params = convert.load_hf(str(tmp_path / "hf"), param_dtype="float32")
  convert.export_hf(cfg, params, str(tmp_path / "ours"), max_shard_bytes=50_000)
  files = sorted(os.listdir(tmp_path / "ours"))
  assert "model.safetensors.index.json" in files and len(files) > 3
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
  toks = _tokens(cfg.vocab_size, (1, 8))
  np.testing.assert_array_equal(_hf_logits(reloaded, toks), _hf_logits(small_hf, toks))
  cfg2, params2 = convert.load_hf(str(tmp_path / "ours"))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_hf_config_round_trip_and_transformers_agree():
  for arch, kw in FAMILIES.values():
    hf_cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**_COMMON, **kw)
    cfg = convert.from_hf_config(hf_cfg.to_dict())
    assert convert.from_hf_config(convert.to_hf_config(cfg, arch)) == cfg
    # transformers reads our config.json to the same numbers.
    theirs = transformers.AutoConfig.for_model(**convert.to_hf_config(cfg, arch))
    assert (theirs.head_dim, theirs.num_key_value_heads) == (cfg.dh, cfg.n_kv_heads)
    assert theirs.rope_parameters["rope_theta"] == cfg.rope_theta


def test_transformers_4_style_config_and_sliding_window():
  old = {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
         "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 10000.0,
         "sliding_window": 4096, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}
  cfg = convert.from_hf_config(old)
  assert cfg.max_seq_len == 4096  # full attention == windowed attention up to the window
  assert cfg.param_dtype == "bfloat16" and cfg.n_kv_heads == 8 and cfg.head_dim is None
  llama31 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 131072,
             "rope_theta": 500000.0, "rope_scaling": {
                 "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
  cfg = convert.from_hf_config(llama31)
  assert cfg.rope_scaling == model.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  qwen = {**llama31, "architectures": ["Qwen2ForCausalLM"], "rope_scaling": None,
          "use_sliding_window": True, "sliding_window": 1024, "max_window_layers": 30}
  assert convert.from_hf_config(qwen).max_seq_len == 1024  # layers 30, 31 use the window
  assert convert.from_hf_config({**qwen, "max_window_layers": 32}).max_seq_len == 131072


# ---- bad input: clear errors, nothing written ---------------------------------------------


def _write_config(path, hf_cfg):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_cfg, f)


def test_import_errors(fam_dir_qwen2, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.load_hf(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    convert.load_hf(str(tmp_path))
  hf_cfg = convert.read_config(fam_dir_qwen2)
  _write_config(tmp_path / "empty", hf_cfg)
  with pytest.raises(FileNotFoundError, match="no weights"):
    convert.load_hf(str(tmp_path / "empty"))
  _write_config(tmp_path / "pickle", hf_cfg)
  (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(ValueError, match="never unpickles.*safe_serialization=True"):
    convert.load_hf(str(tmp_path / "pickle"))
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
    convert.from_hf_config({**hf_cfg, "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="rope_scaling type 'yarn'.*default, linear, llama3"):
    convert.from_hf_config({**hf_cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  for key, value, msg in [("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
                          ("mlp_bias", True, "mlp_bias=True"),
                          ("quantization_config", {"quant_method": "gptq"}, "pre-quantized"),
                          ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5")]:
    with pytest.raises(ValueError, match=msg):
      convert.from_hf_config({**hf_cfg, key: value})
  with pytest.raises(ValueError, match="attention_bias=True"):
    convert.from_hf_config({**hf_cfg, "architectures": ["LlamaForCausalLM"],
                            "attention_bias": True})
  bad = tmp_path / "bad_shape"
  _write_config(bad, {**hf_cfg, "vocab_size": hf_cfg["vocab_size"] + 1})
  os.symlink(os.path.join(fam_dir_qwen2, "model.safetensors"), bad / "model.safetensors")
  with pytest.raises(ValueError, match=r"model.embed_tokens.weight .* has shape \(103, 64\); "
                                       r"config.json implies \(104, 64\)"):
    convert.load_hf(str(bad))
  untied = tmp_path / "untied"
  _write_config(untied, {**hf_cfg, "tie_word_embeddings": False})
  os.symlink(os.path.join(fam_dir_qwen2, "model.safetensors"), untied / "model.safetensors")
  with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
    convert.load_hf(str(untied))


@pytest.fixture(scope="module")
def fam_dir_qwen2(small_hf, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("qwen2_dir"))
  small_hf.save_pretrained(path, safe_serialization=True)
  return path


def test_export_errors_write_nothing(fam_dir_qwen2, tmp_path):
  cfg, params = convert.load_hf(fam_dir_qwen2)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="needs qk_norm=False, qkv_bias=False.*Qwen2ForCausalLM"):
    convert.export_hf(cfg, params, str(out), architecture="LlamaForCausalLM")
  with pytest.raises(ValueError, match="architecture='GPT2LMHeadModel' is not supported"):
    convert.export_hf(cfg, params, str(out), architecture="GPT2LMHeadModel")
  wrong = jax.tree.map(lambda x: x, params)
  wrong["layers_0"]["mlp"]["up"]["kernel"] = jnp.zeros((64, 95))
  with pytest.raises(ValueError, match=r"layers_0/mlp/up/kernel has shape \(64, 95\)"):
    convert.export_hf(cfg, wrong, str(out))
  with pytest.raises(ValueError, match="dtype='int8'"):
    convert.export_hf(cfg, params, str(out), dtype="int8")
  assert not out.exists()
  convert.export_hf(cfg, params, str(out))
  with pytest.raises(ValueError, match="already holds a model"):
    convert.export_hf(cfg, params, str(out))
