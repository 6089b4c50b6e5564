"""Smoke test of experiments.bench_matmul (the few-row matmul sweep)."""
import json
import os
import shutil
import subprocess
import sys

import jax

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.bench_matmul', *args],
                        capture_output=True, text=True, timeout=300, cwd=_ROOT)


def test_bench_matmul_smoke(tmp_path):
  proc = _run(f'--workdir={tmp_path}', '--rows=2,3', '--d_in=16', '--d_out=32', '--weights=2',
              '--iterations=2', '--repeats=1')
  assert proc.returncode == 0, proc.stderr
  results = json.load(open(tmp_path / 'results.json'))
  assert '--xla_cpu_experimental_ynn_fusion_type=' in results['xla_flags']
  got = {(r['form'], r['rows']): r for r in results['rows']}
  assert sorted(got) == [(f, t) for f in ('gemm', 'kernel', 'rows') for t in (1, 2, 3)]  # T=1 always
  assert got[('gemm', 1)]['vs_one_row'] == 1.0
  assert all(r['us_per_matmul'] > 0 for r in results['rows'])


def test_bench_matmul_bad_flags(tmp_path):
  proc = _run(f'--workdir={tmp_path}', '--forms=gemv')   # not a form
  assert proc.returncode != 0 and '--forms' in proc.stderr
  proc = _run(f'--workdir={tmp_path}', '--d_in=64', '--d_out=32')
  assert proc.returncode != 0 and '--d_out' in proc.stderr


def test_the_microkernel_bench_compiles_against_the_kernel_header():
  """experiments/bench_microkernel.cc includes rows_matmul.h's templates: a header change that
  breaks it fails here (syntax only, no run)."""
  compiler = shutil.which(os.environ.get('CXX', 'c++')) or shutil.which('g++')
  subprocess.run([compiler, '-fsyntax-only', '-march=native', '-std=c++17', '-w', '-I',
                  os.path.join(_ROOT, 'jax_spec', 'kernels'), '-I', jax.ffi.include_dir(),
                  os.path.join(_ROOT, 'experiments', 'bench_microkernel.cc')], check=True)
