"""Example config file: the `small` preset, wider, in bf16.

  python -m experiments.train --config=configs/small_wide.py --workdir=runs/wide
  python -m experiments.train --config=configs/small_wide.py --model.num_layers=6 --workdir=...

`get_config()` returns TrainConfig fields (jax_spec/training/config.py); `model` overrides fields
of the preset's TransformerConfig (jax_spec/models/config.py). Flags on the command line override
this file.
"""


def get_config():
  return {
      'config': 'small',
      'steps': 2000,
      'precision': 'bf16',
      'learning_rate': 2e-3,
      'model': {'d_model': 384, 'num_heads': 6, 'd_ff': 1152, 'rope_theta': 50_000.0},
  }
