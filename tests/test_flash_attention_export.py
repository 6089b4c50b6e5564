"""The real (non-interpret) kernels lower on this CPU-only machine: Triton for CUDA, Mosaic for TPU.

`jax.export` runs the Pallas -> Triton (resp. Mosaic) lowering in Python and serializes the
kernels as custom calls. The Triton custom call has no export compatibility guarantee, so it has
to be allowed explicitly; `tpu_custom_call` is on JAX's stable list. What this does not check is
the final Triton -> PTX / Mosaic -> TPU compile, which needs the device.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from pallas_kernels.flash_attention import flash_attention

TRITON_CALL = '__gpu$xla.gpu.triton'
ALLOW_TRITON = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]


def _export(platform, *, grad, batch=1, q_len=300, kv_len=300, heads=4, kv_heads=2,
            head_dim=64, dtype=jnp.bfloat16, segments=False, **kw):
  backend = 'gpu' if platform == 'cuda' else 'tpu'
  q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
  args = [q, kv, kv]
  if segments:
    args += [jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
             jax.ShapeDtypeStruct((batch, kv_len), jnp.int32)]

  def fn(q, k, v, *ids):
    ids = dict(q_segment_ids=ids[0], kv_segment_ids=ids[1]) if ids else {}
    attention = lambda q, k, v: flash_attention(q, k, v, backend=backend, interpret=False,
                                                **ids, **kw)
    if not grad:
      return attention(q, k, v)
    o, vjp = jax.vjp(attention, q, k, v)
    return vjp(o.astype(jnp.float32).astype(o.dtype))

  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=ALLOW_TRITON if platform == 'cuda' else ())(*args)
  return exported.mlir_module()


GPU_CASES = [
    dict(causal=True),
    dict(heads=8, kv_heads=1, dtype=jnp.float16, sliding_window=64),          # MQA
    dict(heads=6, kv_heads=2, segments=True, logit_soft_cap=30.0, causal=True,
         head_dim=96),                                                       # GQA group 3, d pad
    dict(q_len=1, kv_len=1000, dtype=jnp.float32, head_dim=128),             # decode-like
    dict(batch=2, q_len=129, kv_len=77, heads=2, kv_heads=2, head_dim=256, block_q=32,
         block_k=32, causal=True),
    dict(block_q=128, block_k=128, num_warps=4, num_stages=3, causal=True),  # launch options
]


@pytest.mark.parametrize('case', GPU_CASES, ids=['causal', 'mqa-window-fp16',
                                                 'gqa3-segments-softcap-d96', 'decode-fp32',
                                                 'd256-blocks32', 'launch-options'])
def test_triton_kernels_lower_for_cuda(case):
  fwd = _export('cuda', grad=False, **case)
  assert re.findall(r'custom_call @([\w$.]+)', fwd) == [TRITON_CALL]
  assert 'flash_attention_fwd' in fwd
  both = _export('cuda', grad=True, **case)
  # forward (recomputed under vjp), dq and dk/dv kernels; nothing else custom.
  assert re.findall(r'custom_call @([\w$.]+)', both) == [TRITON_CALL] * 3
  for name in ('flash_attention_fwd', 'flash_attention_bwd_dq', 'flash_attention_bwd_dkv'):
    assert name in both


def test_triton_export_needs_the_explicit_allowance():
  q = jax.ShapeDtypeStruct((1, 32, 2, 32), jnp.bfloat16)
  f = jax.jit(lambda q: flash_attention(q, q, q, backend='gpu', interpret=False))
  with pytest.raises(ValueError, match='custom calls'):
    jax.export.export(f, platforms=['cuda'])(q)


@pytest.mark.parametrize('case', [
    dict(causal=True),
    dict(q_len=7, kv_len=129, heads=4, kv_heads=4, dtype=jnp.float32, segments=True,
         sliding_window=50, logit_soft_cap=20.0, head_dim=96),
    dict(q_len=512, kv_len=1024, heads=8, kv_heads=2, block_q=256, block_k=512, causal=True,
         head_dim=128),
], ids=['causal', 'masks-short', 'gqa-big-blocks'])
def test_mosaic_tpu_kernels_lower_for_tpu(case):
  # Lowering reads the target chip from the ambient mesh; there is no TPU here.
  device = AbstractDevice(device_kind='TPU v5 lite', num_cores=1, platform='tpu')
  with use_abstract_mesh(AbstractMesh((1,), ('x',), (AxisType.Explicit,),
                                      abstract_device=device)):
    both = _export('tpu', grad=True, **case)
  assert re.findall(r'custom_call @([\w$.]+)', both) == ['tpu_custom_call'] * 3
