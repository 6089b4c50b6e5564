"""Loading a trained model from its workdir, for decoding or to initialise another run.

Only the parameters are read from the checkpoint (an orbax partial restore): the optimizer state,
twice the size of the parameters with AdamW, is neither rebuilt nor read.
"""
from __future__ import annotations

import os

import jax
from flax import nnx

from jax_spec import precision as precision_lib
from jax_spec.data import load_tokenizer
from jax_spec.models import TransformerConfig
from jax_spec.io import checkpointing
from jax_spec.training import workdir as workdir_lib
from jax_spec.training.sharding import path_to_str
from jax_spec.training.state import build_model, compile_fast, storage_dtype_fn


def load_model_from_workdir(workdir: str, *, step: int | None = None, policy=None, info=None):
  """Rebuilds the trained model: returns `(model, tokenizer, model_config)`.

  Restores params from the latest checkpoint (or `step`); `policy` defaults to the training
  precision. `info`: the run's `workdir.read_run_info`, when the caller has read it already.
  """
  info = workdir_lib.read_run_info(workdir) if info is None else info
  cfg = workdir_lib.train_config_of(workdir, info)
  model_config = TransformerConfig(**info['model'])
  tokenizer = load_tokenizer(os.path.join(workdir, 'tokenizer'))
  if tokenizer.fingerprint != info['tokenizer']['fingerprint']:
    raise ValueError(f'{workdir}/tokenizer does not match the tokenizer the run was trained with')
  policy = precision_lib.get_policy(policy or cfg.precision)

  build = lambda: build_model(model_config, policy, cfg.seed)
  graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  dtype_of = storage_dtype_fn(cfg)  # a frozen trunk is restored in its storage dtype (bf16)
  abstract_params = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, dtype_of(path_to_str(p), x.dtype),
                                        sharding=device), abstract_params)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
                                    read_only=True)
  try:
    _, restored = ckpt.restore_partial(step, {'params': abstract_params})
  except Exception as e:  # orbax: missing files, tree / shape / dtype mismatch
    raise ValueError(f'{workdir}: the checkpoint cannot be restored into the run\'s model config '
                     f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
  finally:
    ckpt.close()
  # Non-parameter variables (none are trained) come from a fresh model.
  rest = compile_fast(jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2]))()
  model = nnx.merge(graphdef, restored['params'], rest)
  return model, tokenizer, model_config
