"""Smoke test of experiments.bench_verify (the verify sweep of the cost model, on the experiments'
XLA:CPU flags); the whole cost model's smoke test is tests/test_cost_model.py."""
import json
import math
import os
import subprocess
import sys

import pytest

from jax_spec.evaluation import verify_ab


def test_bench_verify_smoke(tmp_path):
  cmd = [sys.executable, '-m', 'experiments.bench_verify', f'--workdir={tmp_path}', '--config=tiny',
         '--tokens=1,2', '--tree_tokens=', '--loops=false', '--steps=2', '--repeats=1',
         '--cache_len=32', '--prefix_len=8']
  subprocess.run(cmd, check=True, capture_output=True, timeout=300,
                 cwd=os.path.dirname(os.path.dirname(__file__)))
  results = json.load(open(tmp_path / 'results.json'))
  assert '--xla_cpu_experimental_ynn_fusion_type=' in results['xla_flags']
  rows = {r['tokens']: r for r in results['verify']}
  assert sorted(rows) == [1, 2]                          # T=1 is always measured (the reference)
  assert rows[1]['ratio'] == 1.0 and rows[1]['ceiling_speedup'] == 1.0
  assert math.isfinite(rows[2]['ms_per_step'])   # 2 tiny iterations: below the timer's noise
  assert abs(rows[2]['ceiling_speedup'] - 2 / rows[2]['ratio']) < 1e-9
  assert results['drafters'] == [] and results['profile'] is None
  assert (tmp_path / 'cost_model.png').stat().st_size > 0


def test_ab_compare_times_verify_and_whole_loops_per_variant():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  variants = [verify_ab.Variant.parse(f'a={root}', ''), verify_ab.Variant.parse(f'b={root}', '')]
  results = verify_ab.compare(variants, config='tiny', tokens=[2], cache_len=64, prefix_len=8,
                              steps=2, repeats=2, calls=1, loops=['medusa'])
  parts = [(r['variant'], r['part']) for r in results['rows']]
  assert parts == [(v, p) for v in 'ab' for p in ('1', '2', 'loop plain', 'loop medusa')]
  for r in results['rows']:
    # Finite, not positive: 2 tiny iterations, differenced, are below the timer's noise.
    assert math.isfinite(r['ms_per_step']) and math.isfinite(r['speedup_vs_first'])
    if r['part'] in ('1', 'loop plain'):
      assert r['ratio'] == 1.0   # each is its own unit
  assert results['rows'][0]['speedup_vs_first'] == 1.0
  assert 'loop medusa' in verify_ab.format_table(results)
  with pytest.raises(ValueError, match='loops'):
    verify_ab.compare(variants, loops=['mtp'])


def test_per_iteration_cancels_what_a_call_pays_once():
  """A call of n iterations costing 7 ms once plus 2 ms per iteration reads 2 ms per iteration
  (undifferenced, 16 iterations would read 2.44 ms); the fastest of `calls` calls counts."""
  now = [0.0]
  extra = iter([5.0, 0.0, 0.0, 3.0, 0.0, 0.0])   # disturbed first calls of each count
  def fn(n):
    now[0] += 7e-3 + 2e-3 * n + next(extra) * 1e-3
    return n
  seconds = verify_ab.per_iteration(fn, 16, calls=3, clock=lambda: now[0])
  assert abs(seconds - 2e-3) < 1e-12
