"""`TrainConfig`: every option of a training run, typed, documented and validated field by field.

Each field carries its help text (`experiments.train` turns the fields into flags, so a field
added here is a flag) and, where needed, a check from the table of rules below. Checks that tie
several fields together are in `_check_relations`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

from jax_spec import precision as precision_lib
from jax_spec import runtime
from jax_spec.data import tokenization
from jax_spec.models import config as model_config_lib
from jax_spec.models import losses as losses_lib
from jax_spec.training import steps as steps_lib

CONFIG_FILE = 'train_config.json'
MEDUSA_MODES = ('joint', 'frozen_trunk')
TOKENIZERS = ('bytes', 'byte', 'bpe')
# Storage dtypes of a frozen trunk (`trunk_param_dtype`); a trained trunk keeps fp32 masters.
TRUNK_PARAM_DTYPES = ('float32', 'bfloat16', 'float16')
# Model fields the training config sets itself (from the tokenizer, --seq_len, --medusa_mode) or
# through its own field of the same name: they cannot be overridden through `model`.
DERIVED_MODEL_FIELDS = ('vocab_size', 'medusa_frozen_trunk', 'mtp_depth', 'medusa_heads',
                        'eagle_layers', 'attention_impl')

Check = Callable[[str, Any], None]


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def int_at_least(lo: int, *, optional: bool = False) -> Check:
  def check(name, v):
    if optional and v is None:
      return
    if not _is_int(v) or v < lo:
      suffix = ' (or None for the preset)' if optional else ''
      raise ValueError(f'{name} must be an int >= {lo}{suffix}, got {v!r}')
  return check


def positive_finite(name, v):
  if not _is_number(v) or not v > 0 or math.isinf(v):
    raise ValueError(f'{name} must be a positive finite number, got {v!r}')


def non_negative_finite(name, v):
  if not _is_number(v) or not v >= 0 or math.isinf(v):
    raise ValueError(f'{name} must be a finite number >= 0, got {v!r}')


def one_of(choices) -> Check:
  def check(name, v):
    if v not in choices:
      raise ValueError(f'{name} must be one of {list(choices)}, got {v!r}')
  return check


def _field(default, help_text: str, check: Check | None = None, *, choices=None, **kwargs):
  """A dataclass field with its flag help, its check and (for enums) its choices."""
  if choices is not None and check is None:
    check = one_of(choices)
  return dataclasses.field(default=default, metadata={'help': help_text, 'check': check,
                                                      'choices': choices}, **kwargs)


def _check_fraction(name, v):
  if not _is_number(v) or not 0 <= v <= 1:
    raise ValueError(f'{name} must be in [0, 1], got {v!r}')


def _check_mesh_data(name, v):
  if not _is_int(v) or (v < 1 and v != -1):
    raise ValueError(f'{name} must be -1 (all remaining devices) or >= 1, got {v!r}')


def _check_minutes(name, v):
  if v is not None and (not _is_number(v) or not v > 0):
    raise ValueError(f'{name} must be > 0 (or None), got {v!r}')


def _check_data_path(name, v):
  if v is not None and not os.path.exists(v):
    raise ValueError(f'{name} {v!r} does not exist')


def _check_init_from(name, v):
  if v is not None and not os.path.isfile(os.path.join(v, CONFIG_FILE)):
    raise ValueError(f'{name} {v!r} is not a training workdir (no {CONFIG_FILE})')


def _check_profile_steps(name, v):
  del name  # parse_profile_steps names the option itself
  runtime.parse_profile_steps(v)


def _check_init_from_hf(name, v):
  if v is not None and not os.path.isfile(os.path.join(v, 'config.json')):
    raise ValueError(f'{name} {v!r} is not a Hugging Face model directory (no config.json)')


def _check_workdir(name, v):
  if not isinstance(v, str) or not v:
    raise ValueError(f'{name} must be a non-empty path, got {v!r}')


def _check_model_overrides(name, v):
  if not isinstance(v, dict):
    raise ValueError(f'{name} must be a dict of TransformerConfig fields, got {v!r}')
  fields = {f.name for f in dataclasses.fields(model_config_lib.TransformerConfig)}
  unknown = sorted(set(v) - fields)
  if unknown:
    raise ValueError(f'{name}: unknown model field(s) {unknown}; fields are {sorted(fields)}')
  derived = sorted(set(v) & set(DERIVED_MODEL_FIELDS))
  if derived:
    raise ValueError(f'{name}: {derived} are set by the training config (tokenizer, '
                     '--mtp_depth, --medusa_heads, --eagle_layers, --medusa_mode, '
                     '--freeze_trunk, --attention_impl), not here')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything `train` needs; `experiments.train` derives one flag per field.

  `mtp_depth` / `medusa_heads` None keep the preset's value; `model` overrides any other field of
  the preset's `TransformerConfig` (e.g. `{'d_model': 512}`). `freeze_trunk=True` (Medusa-1,
  EAGLE) trains only the draft heads (MTP, Medusa, EAGLE; start it from a trained trunk with
  `init_from=<workdir>`); `medusa_mode='frozen_trunk'` is the older name of the same setting.
  By default everything trains jointly (Medusa-2 / DeepSeek MTP).
  """
  workdir: str = _field(None, 'Output directory (resumed if it holds checkpoints).',
                        _check_workdir)
  config: str = _field('small', 'Model preset (TransformerConfig) the run starts from.',
                       choices=tuple(model_config_lib.PRESETS))
  model: dict = _field(dataclasses.MISSING, 'Overrides of the preset\'s TransformerConfig fields '
                       '(--model.<field> flags).', _check_model_overrides,
                       hash=False, default_factory=dict)
  steps: int = _field(1000, 'Total optimizer steps.', int_at_least(1))
  batch_size: int = _field(16, 'Global batch size (sequences).', int_at_least(1))
  seq_len: int = _field(256, 'Tokens per sequence (>= 2: a target needs a context).',
                        int_at_least(2))
  learning_rate: float = _field(1e-3, 'Peak learning rate (AdamW).', positive_finite)
  warmup_steps: int = _field(100, 'Linear warmup steps before the cosine decay.',
                             int_at_least(0))
  min_lr_ratio: float = _field(0.1, 'Final learning rate as a fraction of the peak.',
                               _check_fraction)
  weight_decay: float = _field(0.1, 'AdamW weight decay (matrices only).', non_negative_finite)
  grad_clip: float = _field(1.0, 'Global gradient-norm clipping threshold.', positive_finite)
  precision: str = _field('fp32', 'Compute precision (fp32 master weights of every trained '
                          'parameter).',
                          choices=tuple(sorted(precision_lib.POLICIES)))
  loss_scale: str = _field('dynamic', 'Loss scaling (only used with fp16).',
                           choices=precision_lib.LOSS_SCALE_MODES)
  loss_scale_growth_interval: int = _field(
      precision_lib.DEFAULT_GROWTH_INTERVAL,
      'Finite steps after which the dynamic loss scale doubles.', int_at_least(1))
  mtp_depth: int | None = _field(None, 'DeepSeek MTP modules (default: the preset\'s).',
                                 int_at_least(0, optional=True))
  medusa_heads: int | None = _field(None, 'Medusa heads (default: the preset\'s).',
                                    int_at_least(0, optional=True))
  eagle_layers: int | None = _field(None, 'Blocks of the EAGLE feature drafter, 0 = none '
                                    '(default: the preset\'s).', int_at_least(0, optional=True))
  medusa_mode: str = _field('joint', 'joint (Medusa-2 / MTP) | frozen_trunk (Medusa-1; the same '
                            'as --freeze_trunk).', choices=MEDUSA_MODES)
  freeze_trunk: bool = _field(False, 'Train only the draft heads (MTP, Medusa, EAGLE): the trunk '
                              'gets stop_gradient (no backward pass) and no updates (Medusa-1 / '
                              'EAGLE; start from a trained trunk with --init_from).')
  trunk_param_dtype: str = _field(
      'float32', 'Storage dtype of a frozen trunk\'s parameters, in memory and in checkpoints '
      '(needs --freeze_trunk; heads and their optimizer state stay fp32). bfloat16 halves the '
      'trunk (a 7B model: 14 GB, not 28) and is lossless for checkpoints released in bf16; the '
      'default float32 is exact for any checkpoint.', choices=TRUNK_PARAM_DTYPES)
  head_targets: str = _field('data', 'What every draft head learns: data (the data token), trunk '
                             '(KL to the trunk\'s own distribution: self-distillation) or mix.',
                             choices=losses_lib.HEAD_TARGETS)
  head_targets_mix: float = _field(0.5, 'Weight of the trunk target with --head_targets=mix.',
                                   _check_fraction)
  eagle_steps: int = _field(1, 'EAGLE steps unrolled on its own features at training (1: '
                            'EAGLE-1; > 1: EAGLE-3 training-time test).', int_at_least(1))
  eagle_feature_weight: float = _field(1.0, 'Weight of the EAGLE smooth-L1 feature regression.',
                                       non_negative_finite)
  eagle_token_weight: float = _field(0.1, 'Weight of the EAGLE token cross-entropy.',
                                     non_negative_finite)
  mtp_lambda: float = _field(0.3, 'Weight of the mean MTP loss.', non_negative_finite)
  medusa_weight: float = _field(0.8, 'Medusa head k loss weight is medusa_weight**k.',
                                non_negative_finite)
  seed: int = _field(0, 'Seed for initialisation and data order.', int_at_least(0))
  tokenizer: str = _field('bytes', 'Tokenizer of the corpus.', choices=TOKENIZERS)
  vocab_size: int | None = _field(None, 'BPE vocabulary size (required with --tokenizer=bpe).')
  data_path: str | None = _field(None, 'Text file or directory (default: the Python stdlib).',
                                 _check_data_path)
  attention_impl: str | None = _field(None, 'Attention implementation (default: by backend).',
                                      choices=model_config_lib.ATTENTION_IMPLS)
  init_from: str | None = _field(None, 'Workdir whose params initialise matching params (e.g. a '
                                 'trained trunk for --medusa_mode=frozen_trunk).',
                                 _check_init_from)
  init_from_hf: str | None = _field(None, 'Hugging Face model directory: its model and tokenizer '
                                    'replace the preset and --tokenizer (train heads on it with '
                                    '--freeze_trunk).', _check_init_from_hf)
  log_every: int = _field(10, 'Write training metrics every N steps.', int_at_least(1))
  eval_every: int = _field(200, 'Validate every N steps (and at the end).', int_at_least(1))
  eval_batches: int = _field(8, 'Validation batches per evaluation.', int_at_least(1))
  checkpoint_every: int = _field(200, 'Checkpoint every N steps (and at the end).',
                                 int_at_least(1))
  keep_checkpoints: int = _field(3, 'Keep the last K checkpoints.', int_at_least(1))
  async_checkpoint: bool = _field(True, 'Write checkpoints in a background thread (orbax async '
                                  'save) while training continues; the run waits for the last '
                                  'one before it exits.')
  profile_steps: str | None = _field(None, 'A:B: write a jax.profiler trace of the train steps '
                                     'A <= step < B (step = updates done before it) into '
                                     '<workdir>/profile.', _check_profile_steps)
  minutes: float | None = _field(None, 'Wall-clock budget: save and stop when exceeded.',
                                 _check_minutes)
  mesh_data: int = _field(-1, 'Mesh axis "data" size (-1: all remaining devices).',
                          _check_mesh_data)
  mesh_fsdp: int = _field(1, 'Mesh axis "fsdp" size (parameters sharded).', int_at_least(1))
  mesh_tensor: int = _field(1, 'Mesh axis "tensor" size (heads / hidden sharded).',
                            int_at_least(1))
  coordinator_address: str | None = _field(None, 'Multi-host: host:port of process 0.')
  num_processes: int = _field(1, 'Multi-host: number of processes.', int_at_least(1))
  process_id: int = _field(0, 'Multi-host: this process\'s index.', int_at_least(0))
  progress: bool = _field(True, 'Show a tqdm progress bar.')

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field."""
    for f in dataclasses.fields(self):
      check = f.metadata.get('check')
      if check is not None:
        check(f.name, getattr(self, f.name))
    self._check_relations()

  def _check_relations(self) -> None:
    if self.process_id >= self.num_processes:
      raise ValueError(f'process_id must be < num_processes ({self.num_processes}), '
                       f'got {self.process_id}')
    if self.num_processes > 1 and not self.coordinator_address:
      raise ValueError('coordinator_address is required when num_processes > 1')
    if self.batch_size % self.num_processes:
      raise ValueError(f'batch_size ({self.batch_size}) must be divisible by num_processes '
                       f'({self.num_processes})')
    min_bpe = 256 + len(tokenization.SPECIALS)  # every byte, and the special tokens
    if self.tokenizer == 'bpe' and (not _is_int(self.vocab_size) or self.vocab_size < min_bpe):
      raise ValueError(f'vocab_size must be an int >= {min_bpe} (bytes + specials) for '
                       f'tokenizer=bpe, got {self.vocab_size!r}')
    if self.init_from_hf is not None and (self.init_from is not None or self.tokenizer == 'bpe'):
      raise ValueError('init_from_hf brings its own weights and tokenizer: it excludes init_from '
                       'and tokenizer=bpe')
    if self.trunk_param_dtype != 'float32' and not trunk_frozen(self):
      raise ValueError(f'trunk_param_dtype={self.trunk_param_dtype!r} needs freeze_trunk=True: a '
                       'trunk that trains keeps fp32 master weights')
    max_seq_len = self.model.get('max_seq_len')
    if max_seq_len is not None and _is_int(max_seq_len) and max_seq_len < self.seq_len:
      raise ValueError(f'model.max_seq_len ({max_seq_len}) must be >= seq_len ({self.seq_len})')
    try:
      make_model_config(self, vocab_size=model_config_lib.PRESETS[self.config].vocab_size)
    except (ValueError, TypeError) as e:  # TypeError: a nested config missing a field
      raise ValueError(f'model: the preset {self.config!r} with overrides {self.model} is '
                       f'invalid: {e}') from None

  @property
  def tokenizer_kind(self) -> str:
    return 'byte' if self.tokenizer in ('bytes', 'byte') else self.tokenizer

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def make_model_config(cfg: TrainConfig, vocab_size: int) -> model_config_lib.TransformerConfig:
  """The run's TransformerConfig: the preset (or `init_from_hf`'s config.json, whose vocabulary
  stays the model's), `cfg.model`, and the fields the run derives."""
  if cfg.init_from_hf is not None:
    from jax_spec import pretrained  # pylint: disable=g-import-not-at-top
    preset = pretrained.read_config(cfg.init_from_hf)
    vocab_size = preset.vocab_size
    fixed = sorted(set(cfg.model) & set(pretrained.TRUNK_FIELDS) - {'max_seq_len'})
    if fixed:
      raise ValueError(f'model: {fixed} are set by {cfg.init_from_hf}/config.json')
  else:
    preset = model_config_lib.get_config(cfg.config)
  overrides = dict(cfg.model)
  overrides.update(vocab_size=vocab_size, medusa_frozen_trunk=trunk_frozen(cfg))
  if 'max_seq_len' not in overrides:
    overrides['max_seq_len'] = max(preset.max_seq_len, cfg.seq_len)
  for name in ('mtp_depth', 'medusa_heads', 'eagle_layers', 'attention_impl'):
    if getattr(cfg, name) is not None:
      overrides[name] = getattr(cfg, name)
  if cfg.init_from_hf is not None:
    return preset.replace(**overrides)
  return model_config_lib.get_config(cfg.config, **overrides)


def trunk_frozen(cfg: TrainConfig) -> bool:
  return cfg.freeze_trunk or cfg.medusa_mode == 'frozen_trunk'


def trainable_filter(cfg: TrainConfig) -> Callable[[str], bool] | None:
  """Which parameter paths train: all (None), or only the draft heads with a frozen trunk."""
  return steps_lib.head_params if trunk_frozen(cfg) else None


def head_loss(cfg: TrainConfig) -> losses_lib.HeadLoss:
  """The head-loss options of the run (targets and EAGLE steps / weights)."""
  return losses_lib.HeadLoss(targets=cfg.head_targets, mix=float(cfg.head_targets_mix),
                             eagle_steps=cfg.eagle_steps,
                             eagle_feature_weight=float(cfg.eagle_feature_weight),
                             eagle_token_weight=float(cfg.eagle_token_weight))
