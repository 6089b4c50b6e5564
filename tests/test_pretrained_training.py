"""Training heads on a frozen Hugging Face trunk (TrainConfig.init_from_hf): the trunk stays
bit-identical, the heads train, the run resumes, and the workdir decodes with the model's
tokenizer."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from jax_spec import pretrained
from jax_spec.evaluation import speculative_benchmark as benchmark_lib
from jax_spec.pretrained import architectures as arch
from jax_spec.training import config as train_config
from jax_spec.training import loop

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'smollm2')


def flat_params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_train_heads_on_frozen_pretrained_trunk_and_resume(tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  source = open(os.path.join(os.path.dirname(__file__), 'fixtures', 'make_hf_fixtures.py')).read()
  (data / 'a.txt').write_text(source[:3000])
  (data / 'b.txt').write_text(source[3000:6000])
  kwargs = dict(workdir=str(tmp_path / 'run'), init_from_hf=FIXTURE, freeze_trunk=True,
                medusa_heads=2, mtp_depth=0, data_path=str(data), batch_size=2, seq_len=32,
                warmup_steps=0, learning_rate=1e-2, eval_every=2, eval_batches=1, log_every=1,
                checkpoint_every=2, progress=False)
  first = loop.train(train_config.TrainConfig(steps=2, **kwargs))
  resumed = loop.train(train_config.TrainConfig(steps=3, **kwargs))
  assert first['step'] == 2 and resumed['start_step'] == 2 and resumed['step'] == 3
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3]

  trained, tok, config = loop.load_model_from_workdir(str(tmp_path / 'run'))
  loaded, hf_tok, _ = pretrained.from_pretrained(FIXTURE, medusa_heads=2)
  assert tok == hf_tok and config.medusa_heads == 2 and config.vocab_size == 512
  before, after = flat_params(loaded), flat_params(trained)
  trunk = {spec.path for spec in arch.tensor_specs(config)}
  assert trunk < set(after) and set(before) == set(after)
  for p in trunk:
    assert before[p].dtype == after[p].dtype and np.array_equal(before[p], after[p]), p
  assert all(not np.array_equal(before[p], after[p]) for p in set(after) - trunk
             if p[-1] == 'kernel')  # every head trained

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
