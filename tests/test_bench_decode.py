"""Smoke test of experiments.bench_decode (plain decoding, fp32 against bf16 products)."""
import json
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.bench_decode', *args],
                        capture_output=True, text=True, timeout=300, cwd=_ROOT)


def test_bench_decode_smoke(tmp_path):
  proc = _run(f'--workdir={tmp_path}', '--config=tiny', '--prompt_len=4', '--new_tokens=2,5',
              '--repeats=1')
  assert proc.returncode == 0, proc.stderr
  rows = json.load(open(tmp_path / 'results.json'))['rows']
  assert [r['matmul_dtype'] for r in rows] == ['fp32', 'bf16']
  assert rows[0]['speedup'] == 1.0 and all(r['short_call_ms'] > 0 for r in rows)


def test_bench_decode_bad_flags(tmp_path):
  proc = _run(f'--workdir={tmp_path}', '--matmul_dtypes=fp16')
  assert proc.returncode != 0 and '--matmul_dtypes' in proc.stderr
  proc = _run(f'--workdir={tmp_path}', '--config=tiny', '--new_tokens=5,2')
  assert proc.returncode != 0 and 'new_tokens' in proc.stderr
