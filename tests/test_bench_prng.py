"""Smoke test of experiments.bench_prng (a decode step's random numbers, JAX's against prng's)."""
import json
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.bench_prng', *args],
                        capture_output=True, text=True, timeout=300, cwd=_ROOT)


def test_bench_prng_smoke(tmp_path):
  proc = _run(f'--workdir={tmp_path}', '--draws=2', '--vocab=7', '--iterations=3', '--repeats=1')
  assert proc.returncode == 0, proc.stderr
  results = json.load(open(tmp_path / 'results.json'))
  assert [r['form'] for r in results['rows']] == ['jax_per_draw', 'jax_gumbel', 'prng_gumbel',
                                                  'prng_exponential', 'jax_split']
  assert all(r['us_per_step'] > 0 for r in results['rows'])


def test_bench_prng_bad_flags(tmp_path):
  proc = _run(f'--workdir={tmp_path}', '--draws=0')
  assert proc.returncode != 0 and '--draws' in proc.stderr
