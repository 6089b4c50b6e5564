"""Process-level settings: XLA:CPU flags, the compile counter, the step profiler."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest

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


def test_step_profiler_traces_only_its_window(tmp_path):
  f = jax.jit(lambda x: x * 2)
  x = jnp.ones(3)
  with runtime.StepProfiler('1:3', str(tmp_path / 'trace')) as profiler:
    for i in range(5):
      profiler.step(i, wait_for=x)
      assert profiler._active == (1 <= i < 3)  # pylint: disable=protected-access
      x = f(x)
  assert profiler.trace_dir == str(tmp_path / 'trace')
  assert glob.glob(str(tmp_path / 'trace' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  with runtime.StepProfiler(None, str(tmp_path / 'none')) as inert:
    inert.step(0)
  assert inert.trace_dir is None and not os.path.exists(tmp_path / 'none')
  for bad in ('2:2', '3:1', 'a:b', '3', '-1:2'):
    with pytest.raises(ValueError, match='profile_steps must be "A:B"'):
      runtime.parse_profile_steps(bad)
  assert runtime.parse_profile_steps('0:4') == (0, 4)
