"""jax_spec.pretrained: Hugging Face checkpoints match transformers' own logits and greedy text,
round-trip bit for bit, load sharded and in bf16; bad input errors. (Speculative == plain decoding
on a loaded checkpoint: tests/test_text.py.)

The fixtures (tests/fixtures/hf/) were made by tests/fixtures/make_hf_fixtures.py with torch and
transformers, which these tests never import.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.flax import load_file, save_file

from jax_spec import pretrained
from jax_spec.decoding import autoregressive as generate_lib
from jax_spec.pretrained import architectures as arch

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')
ARCHS = ('llama3', 'mistral', 'qwen2', 'qwen3', 'smollm2')


def fixture(name):
  return os.path.join(FIXTURES, name)


def golden(name):
  with open(os.path.join(fixture(name), 'golden.json')) as f:
    return np.load(os.path.join(fixture(name), 'golden.npz')), json.load(f)


def params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# Archs whose features change the KV-cache decode path too (rope scaling, biases, q/k norm and
# head_dim): their greedy continuation is also generated with `generate`.
DECODE_ARCHS = ('llama3', 'qwen2', 'qwen3')


@pytest.mark.parametrize('name', ARCHS)
def test_matches_transformers(name):
  """fp32 logits, the greedy continuation and the tokenizer, against transformers' outputs."""
  model, tok, info = pretrained.from_pretrained(fixture(name))
  arrays, meta = golden(name)
  assert info.extra_tensors == () and info.model_type in pretrained.MODEL_TYPES
  tokens = arrays['tokens']
  prompt_len, greedy = int(arrays['greedy_prompt_len']), arrays['greedy']
  # Row 1: prompt + transformers' greedy continuation, zero-padded (causal: padding is harmless).
  teacher = np.zeros_like(tokens)
  teacher[0, :prompt_len + greedy.shape[1]] = np.concatenate([tokens[0, :prompt_len], greedy[0]])
  with jax.default_matmul_precision('highest'):
    logits = np.asarray(nnx.jit(lambda m, t: m(t).logits_BTV)(
        model, jnp.asarray(np.concatenate([tokens, teacher]))))
  np.testing.assert_allclose(logits[:1], arrays['logits'], rtol=0, atol=2e-5)
  argmax = logits[1, prompt_len - 1:prompt_len - 1 + greedy.shape[1]].argmax(-1)
  np.testing.assert_array_equal(argmax, greedy[0])
  if name in DECODE_ARCHS:
    out = generate_lib.generate(model, jnp.asarray(tokens[:, :prompt_len]),
                                jnp.array([prompt_len]), max_new_tokens=greedy.shape[1])
    np.testing.assert_array_equal(np.asarray(out.tokens_BN), greedy)
  ids = tok.encode(meta['text'])
  assert ids == meta['text_ids']
  assert tok.decode(ids) == meta['decoded'] == meta['text']


def test_features_are_exercised():
  """Each fixture really has the feature it stands for (else the golden test proves little)."""
  configs = {n: pretrained.from_pretrained(fixture(n), tokenizer=False)[0].config for n in ARCHS}
  assert configs['llama3'].rope_scaling.kind == 'llama3' and not configs['llama3'].tie_embeddings
  assert configs['qwen2'].qkv_bias and not configs['qwen2'].out_bias
  assert configs['qwen3'].qk_norm and configs['qwen3'].head_dim == 32 != 64 // 4
  assert configs['smollm2'].tie_embeddings
  assert os.path.isfile(os.path.join(fixture('qwen2'), 'model.safetensors.index.json'))
  assert next(iter(load_file(os.path.join(fixture('mistral'), 'model.safetensors')).values())
              ).dtype == jnp.bfloat16


@pytest.mark.parametrize('name, param_dtype', [('qwen3', jnp.float32), ('mistral', jnp.bfloat16)])
def test_round_trip_bit_exact(tmp_path, name, param_dtype):
  model, tok, _ = pretrained.from_pretrained(fixture(name), param_dtype=param_dtype,
                                             medusa_heads=2, mtp_depth=1, eagle_layers=1)
  # Give the (zero-initialised) Medusa heads values, so saving them is not trivially exact.
  res = model.medusa[0].res[0]
  res.kernel[...] = 0.1 * jax.random.normal(jax.random.key(0), res.kernel.shape)
  pretrained.save_pretrained(model, str(tmp_path), tokenizer=tok)
  back, tok2, info = pretrained.from_pretrained(str(tmp_path), param_dtype=param_dtype)
  assert info.heads_loaded and back.config == model.config and tok2 == tok
  a, b = params(model), params(back)
  assert a.keys() == b.keys()
  for p in a:
    assert a[p].dtype == b[p].dtype and np.array_equal(a[p], b[p]), p
  # The trunk file is the original checkpoint's tensors (bf16 stored as bf16, same bits).
  original = {}
  for f in sorted(os.listdir(fixture(name))):
    if f.endswith('.safetensors'):
      original.update(load_file(os.path.join(fixture(name), f)))
  saved = load_file(str(tmp_path / 'model.safetensors'))
  assert set(saved) == set(original)
  for n in saved:
    as_stored = np.asarray(original[n].astype(param_dtype), np.float32)
    assert saved[n].dtype == param_dtype and np.array_equal(np.asarray(saved[n], np.float32),
                                                            as_stored), n
  # The heads alone.
  pretrained.save_heads(model, str(tmp_path / 'heads_only.safetensors'))
  heads = load_file(str(tmp_path / 'heads_only.safetensors'))
  assert set(heads) == {'.'.join(map(str, p)) for p in pretrained.head_state(model)}
  np.testing.assert_array_equal(heads['medusa.0.res.0.kernel'], res.kernel[...])


def test_bf16_trunk_loads_and_decodes():
  model, _, _ = pretrained.from_pretrained(fixture('llama3'), param_dtype=jnp.bfloat16,
                                           policy='bf16', medusa_heads=2)
  dtypes = {p: v.dtype for p, v in params(model).items()}
  assert all(d == jnp.bfloat16 for p, d in dtypes.items() if p[0] != 'medusa')
  assert all(d == jnp.float32 for p, d in dtypes.items() if p[0] == 'medusa')
  arrays, _ = golden('llama3')
  logits = np.asarray(nnx.jit(lambda m, t: m(t).logits_BTV)(model, jnp.asarray(arrays['tokens'])))
  assert logits.dtype == np.float32
  # bf16 weights and matmuls: close to the fp32 reference, not equal.
  assert 0 < np.abs(logits - arrays['logits']).max() < 0.1
  out = generate_lib.generate(model, jnp.asarray(arrays['tokens'][:, :10]), jnp.array([10]),
                              max_new_tokens=4)
  assert int(out.lengths_B[0]) == 4


def test_config_translation_round_trip():
  for name in ARCHS:
    with open(os.path.join(fixture(name), 'config.json')) as f:
      hf = json.load(f)
    config, _ = arch.config_from_hf(hf)
    assert arch.config_from_hf(arch.config_to_hf(config))[0] == config
  # A sliding window shorter than the context caps max_seq_len (and says so).
  config, warnings = arch.config_from_hf({**hf, 'model_type': 'mistral', 'sliding_window': 64})
  assert config.max_seq_len == 64 and 'sliding_window' in warnings[0]


def test_new_config_fields_validated():
  from jax_spec.models.config import RopeScaling, TransformerConfig, param_count
  with pytest.raises(ValueError, match='head_dim .* must be even'):
    TransformerConfig(explicit_head_dim=15)
  with pytest.raises(ValueError, match='rope scaling kind'):
    RopeScaling('yarn', 2.0)
  with pytest.raises(ValueError, match='qk_norm must be a bool'):
    TransformerConfig(qk_norm=1)
  # A config with rope scaling survives JSON (train_config.json stores dataclasses.asdict).
  config = TransformerConfig(rope_scaling=RopeScaling('llama3', 8.0, 1.0, 4.0, 16))
  assert TransformerConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
  # param_count counts the new parameters (checked against the built model).
  model, _, _ = pretrained.from_pretrained(fixture('qwen2'), tokenizer=False)
  assert param_count(model.config)['total'] == sum(v.size for v in params(model).values())


def copy_fixture(tmp_path, name):
  dst = tmp_path / name
  shutil.copytree(fixture(name), dst)
  return dst


def edit_json(path, **changes):
  with open(path) as f:
    data = json.load(f)
  data.update(changes)
  with open(path, 'w') as f:
    json.dump(data, f)


def test_bad_inputs_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='model directory'):
    pretrained.from_pretrained(str(tmp_path / 'nowhere'))
  d = copy_fixture(tmp_path, 'smollm2')
  with pytest.raises(ValueError, match='param_dtype'):
    pretrained.from_pretrained(str(d), param_dtype=jnp.int32)
  with pytest.raises(ValueError, match='d_model is set by config.json'):
    pretrained.from_pretrained(str(d), d_model=32)
  # Unknown architecture.
  edit_json(d / 'config.json', model_type='gpt2')
  with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
    pretrained.from_pretrained(str(d))
  edit_json(d / 'config.json', model_type='llama', rope_parameters={'rope_type': 'yarn',
                                                                   'rope_theta': 1e4})
  with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
    pretrained.from_pretrained(str(d))
  # Shape mismatch: config says more kv heads than the tensors hold.
  edit_json(d / 'config.json', rope_parameters={'rope_type': 'default', 'rope_theta': 1e5},
            num_key_value_heads=4)
  with pytest.raises(ValueError, match=r'model.safetensors: tensor model.layers.0.self_attn.k_proj'
                                       r'.weight has shape \(32, 64\), expected \(64, 64\)'):
    pretrained.from_pretrained(str(d))
  edit_json(d / 'config.json', num_key_value_heads=2)
  # Missing tensor; extra tensors are reported, not fatal.
  tensors = load_file(str(d / 'model.safetensors'))
  kept = {k: v for k, v in tensors.items() if k != 'model.layers.1.mlp.up_proj.weight'}
  save_file(kept, str(d / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='missing tensor model.layers.1.mlp.up_proj.weight'):
    pretrained.from_pretrained(str(d))
  save_file({**tensors, 'model.rotary_emb.inv_freq': jnp.ones(8)}, str(d / 'model.safetensors'),
            metadata={'format': 'pt'})
  assert pretrained.from_pretrained(str(d))[2].extra_tensors == ('model.rotary_emb.inv_freq',)
  # A tokenizer with more ids than the model's vocabulary.
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(d / 'tokenizer.json'))
  tok.add_tokens([f'<extra_{i}>' for i in range(40)])
  tok.save(str(d / 'tokenizer.json'))
  with pytest.raises(ValueError, match=r'tokenizer.json: the tokenizer has ids up to 519 but the '
                                       r"model's vocab_size is 512"):
    pretrained.from_pretrained(str(d))
  assert pretrained.from_pretrained(str(d), tokenizer=False)[1] is None
  # Missing files.
  os.remove(d / 'tokenizer.json')
  with pytest.raises(ValueError, match='missing file .*tokenizer.json'):
    pretrained.from_pretrained(str(d))
  os.remove(d / 'model.safetensors')
  with pytest.raises(ValueError, match='missing file .*model.safetensors'):
    pretrained.from_pretrained(str(d), tokenizer=False)
  os.remove(d / 'config.json')
  with pytest.raises(ValueError, match='missing file .*config.json'):
    pretrained.from_pretrained(str(d))
  q = copy_fixture(tmp_path, 'qwen2')
  os.remove(q / 'model-00003-of-00004.safetensors')
  with pytest.raises(ValueError, match=r'missing file .*model-00003-of-00004.safetensors \(listed '
                                       r'in .*model.safetensors.index.json\)'):
    pretrained.from_pretrained(str(q))

