"""Smoke test: the quickstart end to end on a tiny budget (a subprocess, as a user runs it)."""
import json
import os
import subprocess
import sys

import pytest


def test_quickstart_end_to_end(tmp_path):
  workdir = tmp_path / 'qs'
  cmd = [sys.executable, '-m', 'experiments.quickstart', f'--workdir={workdir}', '--config=tiny',
         '--steps=6', '--minutes=5', '--batch_size=4', '--seq_len=32', '--mtp_depth=1',
         '--medusa_heads=2', '--drafters=medusa_tree,model_chain', '--sampled_drafters=model_chain',
         '--sampled_temperature=0.7', '--eagle_layers=1', '--tree_nodes=4',
         '--draft_steps=4', '--draft_gamma=3', '--head_steps=2', '--head_phase_medusa_heads=3',
         '--timing_rounds=2',
         '--num_prompts=1', '--prompt_len=8', '--max_new_tokens=12', '--num_completions=1']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  assert [r['drafter'] for r in results['drafters']] == ['medusa (tree)', 'model (chain)',
                                                         'model (chain, T=0.7)']
  sampled = results['drafters'][2]
  assert sampled['temperature'] == 0.7 and sampled['outputs_identical'] is None
  assert 1.0 <= sampled['tau'] <= 4 and results['best_sampled'] == sampled
  for row in results['drafters']:
    assert 0.0 <= row['whitespace_fraction'] <= 1.0
  # 2 Medusa heads of the joint run and a third added by the head phase; gamma 3.
  for row, depth in zip(results['drafters'][:2], (3, 3)):
    for key in ('drafter', 'tau', 'tokens_per_s', 'speedup', 'outputs_identical'):
      assert key in row, key
    assert row['outputs_identical'] is True
    assert row['compiles_while_timing'] == 0   # the warm-up compiled everything that is timed
    assert 1.0 <= row['tau'] <= 1 + depth  # at most one token per draft depth, plus the bonus
    # The speedup is the ratio of the two measured throughputs. (No bound on its value: it is a
    # timing of one 12-token prompt, and one scheduler stall in a loaded CI run made it 110x.)
    assert row['tokens_per_s'] > 0 and row['baseline_tokens_per_s'] > 0
    assert abs(row['speedup'] - row['tokens_per_s'] / row['baseline_tokens_per_s']) < 1e-9
  assert results['draft_train']['step'] == 4
  # The head phase trained on the frozen trunk in <workdir>/heads, and that copy was benchmarked.
  assert results['head_train']['step'] == 2
  assert results['model_workdir'] == str(workdir / 'heads')
  assert (workdir / 'heads' / 'checkpoints').is_dir()
  assert (workdir / 'draft' / 'checkpoints').is_dir()
  assert results['val_bits_per_byte'] > 0
  assert results['benchmark']['timing_rounds'] == 2
  assert set(results['heads']) == {'mtp', 'medusa'}
  assert len(results['completions']) == 1
  for png in ('training_curves.png', 'speedups.png'):
    assert (workdir / png).stat().st_size > 0
  assert 'speedup' in proc.stdout and 'identical' in proc.stdout
  # Library chatter is hidden by default: no orbax INFO lines or read-only warnings.
  assert 'checkpoint_manager.py' not in proc.stderr and 'read only' not in proc.stderr

  # --benchmark_only benchmarks the trained run as it is: no training step, no new checkpoint.
  checkpoints = sorted(os.listdir(workdir / 'checkpoints'))
  again = subprocess.run(cmd[:4] + ['--benchmark_only', '--drafters=medusa_chain',
                                    '--sampled_drafters=', '--tree_nodes=4', '--num_prompts=1', '--prompt_len=8',
                                    '--max_new_tokens=12', '--num_completions=0'],
                         capture_output=True, text=True, env=env, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
  assert again.returncode == 0, again.stderr[-3000:]
  rerun = json.loads((workdir / 'results.json').read_text())
  assert rerun['train']['step'] == 6 and rerun['train']['stopped'] == 'benchmark_only'
  assert rerun['model_workdir'] == str(workdir / 'heads')
  assert rerun['val_bits_per_byte'] == results['val_bits_per_byte']
  assert [r['drafter'] for r in rerun['drafters']] == ['medusa (chain)']
  assert rerun['drafters'][0]['outputs_identical'] is True
  assert sorted(os.listdir(workdir / 'checkpoints')) == checkpoints


def test_quickstart_rejects_unknown_drafter(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.quickstart', f'--workdir={tmp_path}',
                         '--drafters=eagle_tree'], capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode != 0
  assert '--drafters' in proc.stderr


@pytest.mark.parametrize('flag', ['--timing_rounds=0', '--head_minutes=0', '--head_steps=-1',
                                  '--head_phase_medusa_heads=1'])
def test_quickstart_rejects_bad_phase_and_timing_flags_before_training(tmp_path, flag):
  proc = subprocess.run([sys.executable, '-m', 'experiments.quickstart', f'--workdir={tmp_path}',
                         flag], capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode != 0
  assert flag.split('=')[0] in proc.stderr
  assert not (tmp_path / 'checkpoints').exists()   # nothing trained
