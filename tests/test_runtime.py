"""Process-level XLA settings and the verify-cost benchmark that motivates them."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from jax_spec import runtime


def test_configure_xla_cpu_appends_once_and_respects_the_user(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_foo=1')
  assert runtime.configure_xla_cpu() == '--xla_foo=1 --xla_cpu_experimental_ynn_fusion_type='
  assert runtime.configure_xla_cpu() == os.environ['XLA_FLAGS']       # idempotent
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  assert runtime.configure_xla_cpu() == '--xla_cpu_experimental_ynn_fusion_type=dot'
  monkeypatch.delenv('XLA_FLAGS')
  assert runtime.configure_xla_cpu(('--xla_bar=2',)) == '--xla_bar=2'


def test_count_compiles():
  f = jax.jit(lambda x: x * 3 + 1)
  x = jnp.arange(5.0)
  with runtime.count_compiles() as n:
    f(x).block_until_ready()
  assert n[0] == 1
  with runtime.count_compiles() as n:
    f(x + 1).block_until_ready()   # cached program (the `+ 1` outside is a separate op)
    f(x).block_until_ready()
  assert n[0] == 1                 # ... only `x + 1` itself compiled
  with runtime.count_compiles() as n:
    f(x).block_until_ready()
  assert n[0] == 0


def test_bench_verify_smoke(tmp_path):
  cmd = [sys.executable, '-m', 'experiments.bench_verify', f'--workdir={tmp_path}', '--config=tiny',
         '--precisions=fp32', '--tokens=2', '--steps=2', '--repeats=1', '--cache_len=32',
         '--prefix_len=8']
  subprocess.run(cmd, check=True, capture_output=True, timeout=300,
                 cwd=os.path.dirname(os.path.dirname(__file__)))
  results = json.load(open(tmp_path / 'results.json'))
  assert '--xla_cpu_experimental_ynn_fusion_type=' in results['xla_flags']
  rows = {r['tokens']: r for r in results['rows']}
  assert sorted(rows) == [1, 2]                          # T=1 is always measured (the reference)
  assert rows[1]['ratio'] == 1.0 and rows[1]['ceiling_speedup'] == 1.0
  assert rows[2]['ms_per_step'] > 0
  assert abs(rows[2]['ceiling_speedup'] - 2 / rows[2]['ratio']) < 1e-9
  assert (tmp_path / 'verify_cost.png').stat().st_size > 0
