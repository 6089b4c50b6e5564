"""Smoke test: experiments.profile_regions attributes a traced loop to its body's source calls."""
import json
import os
import subprocess
import sys


def test_profile_regions_tiny(tmp_path):
  cmd = [sys.executable, '-m', 'experiments.profile_regions', f'--workdir={tmp_path}',
         '--config=tiny', '--eagle_d_ff=0', '--prompt_len=8', '--max_new_tokens=12',
         '--loops=plain,eagle:chain:3']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results) == {'plain', 'eagle:chain:3'}
  for spec, want in (('plain', 'extend > Block.decode'),
                     ('eagle:chain:3', 'propose > feature_chain')):
    regions = results[spec]['regions']
    assert any(r['region'].endswith(want) and r['self_us'] > 0 for r in regions), (spec, regions)
    assert all(r['share'] > 0 for r in regions)
  assert results['plain']['loop_steps'] == 11   # the prefill emits the first token
  assert '| region |' in proc.stdout


def test_profile_regions_rejects_a_bad_loop(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.profile_regions',
                         f'--workdir={tmp_path}', '--loops=eagle'], capture_output=True,
                        text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode != 0 and '--loops' in proc.stderr
