"""Training heads on a frozen Hugging Face trunk (TrainConfig.init_from_hf): the trunk stays
bit-identical in its bf16 storage dtype, the heads train in fp32, the run resumes exactly, and the
workdir decodes with the model's tokenizer."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jax_spec import pretrained
from jax_spec.evaluation import speculative_benchmark as benchmark_lib
from jax_spec.pretrained import architectures as arch
from jax_spec.training import config as train_config
from jax_spec.training import loop
from jax_spec.training import sharding
from jax_spec.training import state as state_lib
from jax_spec.training import steps as steps_lib

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'smollm2')


def flat_params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_train_heads_on_frozen_bf16_pretrained_trunk_and_resume_exactly(tmp_path):
  # A constant learning rate (min_lr_ratio=1): the 2-step run's schedule equals the 3-step one's.
  kwargs = dict(init_from_hf=FIXTURE, freeze_trunk=True, trunk_param_dtype='bfloat16',
                medusa_heads=2, mtp_depth=0, data_path=_text_dir(tmp_path), batch_size=2,
                seq_len=32, warmup_steps=0, learning_rate=1e-2, min_lr_ratio=1.0, eval_every=2,
                eval_batches=1, log_every=1, checkpoint_every=2, progress=False)
  run = lambda name, steps: loop.train(train_config.TrainConfig(
      workdir=str(tmp_path / name), steps=steps, **kwargs))
  first, resumed, straight = run('run', 2), run('run', 3), run('straight', 3)
  assert first['step'] == 2 and resumed['start_step'] == 2 and resumed['step'] == 3
  assert straight['start_step'] == 0

  def metrics(name):
    with open(tmp_path / name / 'metrics.jsonl') as f:
      return [{k: v for k, v in json.loads(line).items() if k not in loop.TIMING_KEYS}
              for line in f]
  assert [m['step'] for m in metrics('run')] == [1, 2, 3]
  assert metrics('run') == metrics('straight')  # the resume is exact
  m = metrics('run')
  assert all(np.isfinite(r['loss']) for r in m)
  # Same validation batch at steps 2 and 3: the frozen main head's loss is unchanged, the heads'
  # loss goes down.
  assert m[1]['val_main_loss'] == m[2]['val_main_loss']
  assert m[2]['val_medusa_loss_1'] < m[1]['val_medusa_loss_1'], m

  trained, tok, config = loop.load_model_from_workdir(str(tmp_path / 'run'))
  loaded, hf_tok, _ = pretrained.from_pretrained(FIXTURE, param_dtype='bfloat16', medusa_heads=2)
  assert tok == hf_tok and config.medusa_heads == 2 and config.vocab_size == 512
  before, after = flat_params(loaded), flat_params(trained)
  uninterrupted = flat_params(loop.load_model_from_workdir(str(tmp_path / 'straight'))[0])
  trunk = {spec.path for spec in arch.tensor_specs(config)}
  assert trunk < set(after) and set(before) == set(after) == set(uninterrupted)
  for p in after:
    assert np.array_equal(after[p], uninterrupted[p]), p
    if p in trunk:  # stored, checkpointed, restored and left untouched in bf16
      assert before[p].dtype == after[p].dtype == jnp.bfloat16, p
      assert np.array_equal(before[p], after[p]), p
    else:
      assert after[p].dtype == jnp.float32, p
  assert all(not np.array_equal(before[p], after[p]) for p in set(after) - trunk
             if p[-1] == 'kernel')  # every head trained
  # The checkpoint itself holds the trunk in bf16 (a restore into fp32 would not show it).
  saved = ocp.PyTreeCheckpointer().metadata(str(tmp_path / 'run' / 'checkpoints' / '3' / 'state'))
  saved = getattr(saved, 'item_metadata', saved)
  saved_dtypes = {sharding.path_to_str(p): np.dtype(m.dtype) for p, m in
                  jax.tree_util.tree_flatten_with_path(saved['params'])[0]}
  assert {d for p, d in saved_dtypes.items() if not steps_lib.head_params(p)} == {
      np.dtype(jnp.bfloat16)}
  assert {d for p, d in saved_dtypes.items() if steps_lib.head_params(p)} == {np.dtype('float32')}

  # Benchmark the trained heads on the user's own prompts (experiments.speculative --prompt_file).
  (tmp_path / 'prompts.txt').write_text('def f(x):\n\nimport json, os\n')
  results = benchmark_lib.run_benchmark(benchmark_lib.BenchmarkOptions(
      workdir=str(tmp_path / 'run'), draft='medusa', prompt_file=str(tmp_path / 'prompts.txt'),
      batch_size=2, max_new_tokens=6, output=str(tmp_path / 'bench')))
  assert results['outputs_identical'] is True and results['config']['num_prompts'] == 2
  with pytest.raises(ValueError, match='multiple of batch_size=3'):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path / 'run'), draft='medusa', batch_size=3,
                                   prompt_file=str(tmp_path / 'prompts.txt'))
  with pytest.raises(ValueError, match='is not a file'):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path / 'run'), prompt_file=str(tmp_path))


def test_init_from_hf_config_errors(tmp_path):
  base = dict(workdir=str(tmp_path), init_from_hf=FIXTURE)
  with pytest.raises(ValueError, match='not a Hugging Face model directory'):
    train_config.TrainConfig(workdir=str(tmp_path), init_from_hf=str(tmp_path))
  with pytest.raises(ValueError, match='excludes init_from and tokenizer=bpe'):
    train_config.TrainConfig(**base, tokenizer='bpe', vocab_size=300)
  with pytest.raises(ValueError, match=r"\['d_model'\] are set by .*config.json"):
    train_config.TrainConfig(**base, model={'d_model': 32})
  cfg = train_config.TrainConfig(**base, medusa_heads=3, seq_len=64)
  model_config = train_config.make_model_config(cfg, vocab_size=259)  # the tokenizer's is ignored
  assert model_config.vocab_size == 512 and model_config.medusa_heads == 3
  assert model_config.replace(medusa_heads=0, medusa_frozen_trunk=False) == pretrained.read_config(
      FIXTURE).replace(init_std=model_config.init_std)


def _text_dir(tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  source = open(os.path.join(os.path.dirname(__file__), 'fixtures', 'make_hf_fixtures.py')).read()
  (data / 'a.txt').write_text(source[:3000])
  (data / 'b.txt').write_text(source[3000:6000])
  return str(data)


def test_bf16_frozen_trunk_state_holds_heads_in_fp32_and_no_trunk_optimizer_state(tmp_path):
  base = dict(workdir=str(tmp_path), init_from_hf=FIXTURE, freeze_trunk=True, medusa_heads=2,
              mtp_depth=0, seq_len=32, steps=3)
  with pytest.raises(ValueError, match="trunk_param_dtype='bfloat16' needs freeze_trunk"):
    train_config.TrainConfig(**{**base, 'freeze_trunk': False}, trunk_param_dtype='bfloat16')
  setups = {}
  for dtype in ('float32', 'bfloat16'):
    cfg = train_config.TrainConfig(**base, trunk_param_dtype=dtype)
    setups[dtype] = state_lib.create_train_state(cfg, train_config.make_model_config(cfg, 512))
  flat = {k: {sharding.path_to_str(p): x for p, x in
              jax.tree_util.tree_flatten_with_path(s.state['params'])[0]}
          for k, s in setups.items()}
  heads = {p for p in flat['bfloat16'] if steps_lib.head_params(p)}
  trunk = set(flat['bfloat16']) - heads
  assert heads and trunk
  assert all(flat['bfloat16'][p].dtype == jnp.bfloat16 for p in trunk)
  assert all(flat['bfloat16'][p].dtype == jnp.float32 for p in heads)
  assert all(x.dtype == jnp.float32 for x in flat['float32'].values())
  size = lambda paths: sum(flat['float32'][p].size for p in paths)
  # AdamW holds two fp32 moments per head element and nothing for the trunk (plus step counts).
  for s in setups.values():
    opt_float = [x for x in jax.tree.leaves(s.state['opt_state'])
                 if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sum(x.size for x in opt_float) == 2 * size(heads)
    assert all(x.dtype == jnp.float32 for x in opt_float)
  fp32, bf16 = (setups[k].state for k in ('float32', 'bfloat16'))
  assert state_lib.tree_bytes(fp32['opt_state']) == state_lib.tree_bytes(bf16['opt_state'])
  assert state_lib.tree_bytes(fp32['params']) - state_lib.tree_bytes(bf16['params']) == (
      2 * size(trunk))
