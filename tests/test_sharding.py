"""jax_spec.training.sharding: rules in-process; meshes and sharded compute on 8 simulated CPU
devices in a subprocess (the pytest process has already initialised JAX with one device)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jax_spec.training import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_222 = AbstractMesh((2, 2, 2), sharding.AXES)


def _run(script: str, devices: int = 8, extra_env=None, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.update(extra_env or {})
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(script)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout


@pytest.mark.parametrize('path, shape, expected', [
    ('embed/embedding', (256, 64), P('tensor', 'fsdp')),
    ('embed/embedding', (259, 64), P(None, 'fsdp')),  # 259 % 2: vocab dim replicated.
    ('layers/0/attn/q/kernel', (64, 4, 16), P('fsdp', 'tensor')),
    ('layers/3/attn/k/kernel', (64, 1, 16), P('fsdp')),  # MQA: one kv head cannot be split.
    ('layers/0/attn/out/kernel', (4, 16, 64), P('tensor', None, 'fsdp')),
    ('layers/0/mlp/gate/kernel', (64, 192), P('fsdp', 'tensor')),
    ('layers/0/mlp/up/kernel', (64, 192), P('fsdp', 'tensor')),
    ('layers/0/mlp/down/kernel', (192, 64), P('tensor', 'fsdp')),
    ('layers/0/mlp_norm/scale', (64,), P()),
    ('final_norm/scale', (64,), P()),
    ('lm_head/kernel', (64, 256), P('fsdp', 'tensor')),
    ('medusa/1/lm_head', (64, 256), P('fsdp', 'tensor')),
    ('medusa/0/res/0/kernel', (64, 64), P('fsdp')),
    ('medusa/0/res/0/bias', (64,), P()),
    ('mtp/0/proj/kernel', (128, 64), P('fsdp')),
    ('mtp/0/block/attn/v/kernel', (64, 2, 16), P('fsdp', 'tensor')),
    ('opt_state/0/mu/layers/0/mlp/down/kernel', (192, 64), P('tensor', 'fsdp')),
    ('opt_state/0/count', (), P()),
    ('rng/key', (2,), P()),
    ('layers/0/mlp/gate/kernel', (63, 191), P()),  # Nothing divides: fully replicated.
])
def test_partition_rules(path, shape, expected):
  assert sharding.partition_spec(path, shape, MESH_222) == expected


def test_rules_skip_size_one_axes_and_custom_rules():
  mesh = AbstractMesh((8, 1, 1), sharding.AXES)  # Pure data parallel: params replicated.
  assert sharding.partition_spec('layers/0/attn/q/kernel', (64, 4, 16), mesh) == P()
  rules = ((r'special$', (('data', 'fsdp'), ...)),) + sharding.DEFAULT_RULES
  assert sharding.partition_spec('x/special', (8, 3), MESH_222) == P()  # Default: unmatched.
  assert sharding.partition_spec('x/special', (8, 3), MESH_222, rules) == P(('data', 'fsdp'))
  assert sharding.partition_spec('x/special', (6, 3), MESH_222, rules) == P()  # 6 % 4.
  with pytest.raises(ValueError, match='not in'):
    sharding.partition_spec('x/kernel', (8, 8), MESH_222, ((r'kernel', ('model',)),))


def test_param_specs_on_nested_tree_and_distributed_args():
  tree = {'layers': [{'mlp': {'up': {'kernel': np.zeros((8, 16))}}}], 'step': 3}
  specs = sharding.param_specs(tree, MESH_222)
  assert specs['layers'][0]['mlp']['up']['kernel'] == P('fsdp', 'tensor')
  assert specs['step'] == P()
  sharding.initialize_distributed(None, 1, 0)  # Single process: a no-op.
  with pytest.raises(ValueError, match='num_processes'):
    sharding.initialize_distributed('localhost:1234', 0, 0)
  with pytest.raises(ValueError, match='process_id'):
    sharding.initialize_distributed('localhost:1234', 2, 2)
  with pytest.raises(ValueError, match='coordinator_address'):
    sharding.initialize_distributed('localhost', 2, 0)


def test_make_mesh_single_device_errors():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == sharding.AXES
  with pytest.raises(ValueError, match='device count'):
    sharding.make_mesh(2, 1, 1)
  with pytest.raises(ValueError, match='fsdp'):
    sharding.make_mesh(-1, 0, 1)
  with pytest.raises(ValueError, match='data'):
    sharding.make_mesh(-2, 1, 1)


def test_on_8_devices_meshes_specs_and_sharded_compute():
  out = _run("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from jax_spec import models, data
    from jax_spec.training import sharding as S
    assert jax.device_count() == 8

    shapes = {(-1, 1, 1): (8, 1, 1), (-1, 2, 2): (2, 2, 2), (1, 8, 1): (1, 8, 1),
              (2, 1, 4): (2, 1, 4), (-1, 4, 1): (2, 4, 1)}
    for args, shape in shapes.items():
      assert tuple(S.make_mesh(*args).shape.values()) == shape, (args, S.make_mesh(*args).shape)
    for bad in [(3, 1, 1), (-1, 3, 1), (2, 2, 1)]:
      try:
        S.make_mesh(*bad)
        raise AssertionError(bad)
      except ValueError:
        pass

    mesh = S.make_mesh(2, 2, 2)
    # A jitted matmul on sharded operands equals the unsharded one.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    w = rng.normal(size=(64, 192)).astype(np.float32)
    w_s = S.shard_params({'mlp': {'up': {'kernel': w}}}, mesh)['mlp']['up']['kernel']
    assert w_s.sharding.spec == P('fsdp', 'tensor') and len(w_s.addressable_shards) == 8
    assert w_s.addressable_shards[0].data.shape == (32, 96)
    x_s = jax.device_put(x, S.batch_sharding(mesh))
    y = jax.jit(jnp.matmul)(x_s, w_s)
    np.testing.assert_allclose(np.asarray(y), np.asarray(jax.jit(jnp.matmul)(x, w)), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)

    # The real model: every parameter placed by the rules, forward unchanged. Built abstractly
    # and filled from numpy (eager init compiles one kernel per shape: slow on a busy CPU).
    config = models.get_config('tiny', num_layers=1, mtp_depth=1, medusa_heads=1)
    make = lambda: models.Transformer(config, policy='fp32', rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.1, a.shape).astype(a.dtype)),
                         abstract)
    specs = S.param_specs(state, mesh)
    assert jax.tree.structure(specs) == jax.tree.structure(S.param_specs(abstract, mesh))
    sharded = S.shard_params(state, mesh)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs)[0]
    flat_arrays = jax.tree.leaves(sharded)
    assert len(flat_specs) == len(flat_arrays)
    n_sharded = 0
    for (path, spec), arr in zip(flat_specs, flat_arrays):
      assert arr.sharding.spec == spec, (S.path_to_str(path), arr.sharding.spec, spec)
      n_sharded += spec != P()
    assert n_sharded >= 12, n_sharded
    got = {S.path_to_str(p): s for p, s in flat_specs}
    assert got['layers/0/attn/q/kernel'] == P('fsdp', 'tensor'), got
    assert got['layers/0/mlp/down/kernel'] == P('tensor', 'fsdp'), got
    assert got['mtp/0/block/attn/out/kernel'] == P('tensor', None, 'fsdp'), got
    for a, b in zip(jax.tree.leaves(state), flat_arrays):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Optimizer state copies of the parameters get the same specs by path.
    opt = nnx.eval_shape(lambda: nnx.Optimizer(make(), optax.adamw(1e-3), wrt=nnx.Param))
    opt_specs = {S.path_to_str(p): s for p, s in
                 jax.tree_util.tree_flatten_with_path(S.param_specs(nnx.state(opt), mesh))[0]}
    assert opt_specs['opt_state/0/mu/layers/0/mlp/down/kernel'] == P('tensor', 'fsdp'), opt_specs
    assert opt_specs['opt_state/0/nu/embed/embedding'] == P(None, 'fsdp'), opt_specs

    # Batches: process-local numpy rows -> global sharded arrays.
    docs = [data.Document(f'f{i}', 'abc def ' * (i + 3)) for i in range(40)]
    stream = data.build_stream(data.ByteTokenizer(), docs)
    batch = data.get_batch(stream, 0, 0, 8, 32)
    gbatch = S.make_global_batch(batch, mesh)
    assert gbatch['tokens'].sharding.spec == P(('data', 'fsdp'))
    assert gbatch['tokens'].addressable_shards[0].data.shape == (2, 32)

    @jax.jit
    def forward(state, b):
      out = nnx.merge(graphdef, state)(b['tokens'], positions_BT=b['positions'],
                                       segment_ids_BT=b['segment_ids'])
      return out.logits_BTV, out.mtp_logits_JBTV, out.medusa_logits_JBTV

    ref = forward(state, {k: jnp.asarray(v) for k, v in batch.items()})
    res = forward(sharded, gbatch)
    for a, b in zip(ref, res):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)
    print('OK', n_sharded)
  """)
  assert 'OK' in out


def test_two_processes_distributed_batch():
  """Two CPU processes (2 devices each) joined by `initialize_distributed`: each feeds its own
  rows, and the global batch equals the single-process batch."""
  script = """
    import sys, numpy as np, jax, jax.numpy as jnp
    from jax_spec import data
    from jax_spec.training import sharding as S
    pid = int(sys.argv[1])
    S.initialize_distributed('localhost:' + sys.argv[2], 2, pid)
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = S.make_mesh(-1, 2, 1)
    docs = [data.Document(f'f{i}', 'xyz ' * (i + 5)) for i in range(30)]
    stream = data.build_stream(data.ByteTokenizer(), docs)
    local = data.get_batch(stream, 1, 4, 8, 16, jax.process_index(), jax.process_count())
    g = S.make_global_batch(local, mesh)
    assert g['tokens'].shape == (8, 16)
    full = data.get_batch(stream, 1, 4, 8, 16)
    weights = jnp.arange(8 * 16, dtype=jnp.int32).reshape(8, 16)
    total = int(jax.jit(lambda t: jnp.sum(t * weights))(g['tokens']))
    assert total == int(np.sum(full['tokens'].astype(np.int64) * np.arange(8 * 16).reshape(8, 16)))
    print('OK', pid, total)
  """
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  procs = [subprocess.Popen([sys.executable, '-c', textwrap.dedent(script), str(p), port],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for p in range(2)]
  outs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    outs.append(out)
  assert all('OK' in o for o in outs)
