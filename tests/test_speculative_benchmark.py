"""The speculative benchmark (jax_spec.evaluation.speculative_benchmark) and its experiment."""
import json
import subprocess
import sys

import pytest

from jax_spec.evaluation import speculative_benchmark as benchmark_lib


def test_options_and_load_run_reject_missing_runs(tmp_path):
  with pytest.raises(ValueError, match='not a directory'):
    benchmark_lib.load_run(str(tmp_path / 'nope'), 'workdir')
  with pytest.raises(ValueError, match='train_config.json'):
    benchmark_lib.load_run(str(tmp_path), 'workdir')
  with pytest.raises(ValueError, match='workdir .* is not a directory'):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path / 'nope'))
  with pytest.raises(ValueError, match='draft_workdir'):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path), draft='model')
  with pytest.raises(ValueError, match='draft must be one of'):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path), draft='oracle')
  with pytest.raises(ValueError, match='profile_steps'):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path), profile_steps='3:1')
  with pytest.raises(ValueError, match='multiple of batch_size'):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path), num_prompts=3, batch_size=2)
  with pytest.raises(ValueError, match='timing_rounds must be an int >= 1'):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path), timing_rounds=0)
  with pytest.raises(ValueError, match="drafter_dtype must be one of \\('fp32', 'bf16'\\)"):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path), drafter_dtype='fp16')
  with pytest.raises(ValueError, match="matmul_dtype must be one of \\('fp32', 'bf16'\\)"):
    benchmark_lib.BenchmarkOptions(workdir=str(tmp_path), matmul_dtype='int8')


@pytest.mark.slow
def test_experiment_end_to_end(tmp_path):
  """Trains a tiny run for a few steps, then runs the experiment on it (minutes on a CPU)."""
  run = tmp_path / 'run'
  subprocess.run([sys.executable, '-m', 'experiments.train', f'--workdir={run}', '--config=tiny',
                  '--steps=4', '--batch_size=4', '--seq_len=64', '--eval_every=4',
                  '--checkpoint_every=4', '--progress=false'], check=True)
  out = tmp_path / 'out'
  for draft, tree in (('mtp', 'derived'), ('medusa', 'default')):
    subprocess.run([sys.executable, '-m', 'experiments.speculative', f'--workdir={run}',
                    f'--draft={draft}', f'--tree={tree}', '--tree_nodes=4', '--derive_batches=1',
                    '--num_prompts=2', '--prompt_len=8', '--max_new_tokens=12', f'--output={out}'],
                   check=True)
    results = json.loads((out / 'results.json').read_text())
    assert results['outputs_identical'] is True
    assert results['speculative']['mean_accepted_length'] >= 1
    assert (out / 'accepted_length_hist.png').exists() and (out / 'acceptance_per_depth.png').exists()
  bad = subprocess.run([sys.executable, '-m', 'experiments.speculative', f'--workdir={run}',
                        '--draft=model', '--num_prompts=1'], capture_output=True, text=True)
  assert bad.returncode == 2 and 'draft_workdir' in bad.stderr
