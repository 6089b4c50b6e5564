"""Smoke test of experiments.distill: the model's own greedy continuations become documents that
the training data pipeline reads; an interrupted run resumes without redoing batches."""
import os
import types

from experiments import distill
from jax_spec import pretrained
from jax_spec.data import corpus
from jax_spec.decoding import text as text_lib

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'smollm2')


def test_distill_writes_self_generated_documents(tmp_path):
  (tmp_path / 'prompts.txt').write_text('def f(x):\n\nimport os\nclass A:\n')
  f = types.SimpleNamespace(init_from_hf=FIXTURE, prompts=str(tmp_path / 'prompts.txt'),
                            workdir=str(tmp_path / 'out'), max_new_tokens=5, samples_per_prompt=1,
                            batch_size=3, temperature=0.0, top_p=1.0, seed=0,
                            param_dtype='float32', precision='fp32')
  summary = distill.run(f)
  assert summary['documents'] == 3 and summary['written_this_run'] == 3
  docs = corpus.directory_documents(summary['data_path'])
  model, tok, _ = pretrained.from_pretrained(FIXTURE)
  expected = text_lib.generate_text(model, tok, ['def f(x):', 'import os', 'class A:'],
                                    max_new_tokens=5)
  assert [d.text for d in docs] == [p + c for p, c in zip(['def f(x):', 'import os', 'class A:'],
                                                          expected.texts)]
  assert distill.run(f)['written_this_run'] == 0  # resumed: nothing left to do
