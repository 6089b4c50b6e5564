"""Command lines over typed dataclasses: one absl flag per field, config files, usage errors.

`define_flags(Options)` defines a flag per dataclass field (help text from the field's
`metadata['help']`, choices from `metadata['choices']`, type from the annotation), so a field
added to the dataclass is a flag with no hand-written definition; `prefix='model.'` gives dotted
flags (`--model.d_model=512`) for a nested config. `flag_values(Options)` reads them back.
`load_config_file` reads a `.py` file's `get_config()` (a dict) or a `.json` file.

`run(main)` is `absl.app.run` with errors a person can read: a flag that does not parse, or a
`ValueError` / `app.UsageError` raised by `main` (an invalid value found after parsing: in a
config, the data pipeline, the sampler), ends the process with one line
`<program>: error: <message>` on stderr and exit status 2, without a traceback and without the
flag help. `--verbosity=1` (debug) shows the traceback of such a ValueError instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import runpy
import sys
import types
import typing
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging as absl_logging

FLAGS = flags.FLAGS
USAGE_EXIT_CODE = 2


def _program() -> str:
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0])


def usage_exit(message: str) -> typing.NoReturn:
  """Prints `<program>: error: <message>` (one line) and exits with status 2."""
  one_line = ' '.join(str(message).split())
  sys.stderr.write(f'{_program()}: error: {one_line}\n')
  sys.stderr.flush()
  sys.exit(USAGE_EXIT_CODE)


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    usage_exit(str(e))


def run(main: Callable[[list[str]], Any], *, quiet: bool = False) -> None:
  """`app.run(main)` with one-line usage errors (exit status 2) for bad flags and for
  ValueError / app.UsageError raised by `main`. quiet: `quiet_libraries()` before `main` (for
  scripts that load or save checkpoints)."""

  def wrapped(argv):
    if len(argv) > 1:
      usage_exit(f'unexpected arguments: {argv[1:]}')
    if quiet:
      quiet_libraries()
    try:
      return main(argv)
    except app.UsageError as e:
      usage_exit(str(e))
    except ValueError as e:
      if absl_logging.get_verbosity() >= absl_logging.DEBUG:
        raise
      usage_exit(str(e))

  app.run(wrapped, flags_parser=_parse_flags)


def quiet_libraries() -> None:
  """This package's progress messages at INFO; library chatter (orbax's INFO line per save or
  restore, its read-only-checkpoint warnings) hidden, unless `--verbosity` was given."""
  logging.getLogger('jax_spec').setLevel(logging.INFO)
  if not FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.ERROR)


# ----------------------------------------------------------------------------------------------
# Flags from dataclass fields
# ----------------------------------------------------------------------------------------------

def _base_type(annotation) -> tuple[Any, bool]:
  """(the type, whether None is allowed) of `int`, `int | None`, `Optional[int]`, ..."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1:
      return args[0], True
  return annotation, False


def field_default(field: dataclasses.Field) -> Any:
  """The field's default (its factory called), or None when it has none."""
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return None


def define_flags(cls, *, prefix: str = '', skip=(), defaults: dict[str, Any] | None = None,
                 help_suffix: str = '', flag_values=FLAGS, module_name: str | None = None
                 ) -> list[str]:
  """Defines one flag per field of dataclass `cls` (except `skip`); returns the field names.

  Flag `prefix + name`; default `defaults[name]` if given, else the field's default; help from
  `metadata['help']` (else the field name) plus `help_suffix`; `metadata['choices']` makes an
  enum. Supported field types: bool, int, float, str (each optionally `| None`),
  `tuple[int | float | str, ...]` (a comma-separated list) and a nested dataclass (one dotted flag
  `name.sub` per field of it, returned as 'name.sub'; unset sub-flags are left out). Other types
  raise TypeError: give such a field a flag by hand and skip it here.
  """
  hints = typing.get_type_hints(cls)
  if module_name is None:
    # --help lists flags under the module that defines them: the caller, not this module.
    module_name = sys._getframe(1).f_globals.get('__name__')  # pylint: disable=protected-access
    if module_name == '__main__':
      module_name = sys.argv[0]
  kwargs = {'flag_values': flag_values, 'module_name': module_name}
  names = []
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    kind, _ = _base_type(hints[field.name])
    name = prefix + field.name
    default = (defaults or {}).get(field.name, field_default(field))
    help_text = field.metadata.get('help', field.name) + help_suffix
    choices = field.metadata.get('choices')
    if dataclasses.is_dataclass(kind):
      sub = define_flags(kind, prefix=name + '.', flag_values=flag_values,
                         defaults={f.name: None for f in dataclasses.fields(kind)},
                         help_suffix=f' ({kind.__name__} field of {name})',
                         module_name=module_name)
      names += [f'{field.name}.{n}' for n in sub]
      continue
    if choices is not None:
      flags.DEFINE_enum(name, default, [c for c in choices if c is not None], help_text,
                        **kwargs)
    elif kind is bool:
      flags.DEFINE_bool(name, default, help_text, **kwargs)
    elif kind is int:
      flags.DEFINE_integer(name, default, help_text, **kwargs)
    elif kind is float:
      flags.DEFINE_float(name, default, help_text, **kwargs)
    elif kind is str:
      flags.DEFINE_string(name, default, help_text, **kwargs)
    elif typing.get_origin(kind) is tuple:
      flags.DEFINE_list(name, None if default is None else [str(v) for v in default], help_text,
                        **kwargs)
    else:
      raise TypeError(f'{cls.__name__}.{field.name}: no flag for type {hints[field.name]!r}; '
                      'define its flag by hand and pass it in `skip`')
    names.append(field.name)
  return names


def _field_kind(cls, path: str):
  """The (None-stripped) type of field `path` ('a' or 'a.b' for nested dataclasses) of `cls`."""
  kind = cls
  for part in path.split('.'):
    kind, _ = _base_type(typing.get_type_hints(kind)[part])
  return kind


def _convert(cls, name: str, value: Any) -> Any:
  """A list flag's strings to the field's tuple element type."""
  kind = _field_kind(cls, name)
  if value is None or typing.get_origin(kind) is not tuple:
    return value
  element = typing.get_args(kind)[0]
  try:
    return tuple(element(v) for v in value)
  except ValueError:
    raise ValueError(f'--{name} must be a comma-separated list of {element.__name__}, '
                     f'got {",".join(value)}') from None


def flag_values(cls, names, *, prefix: str = '', only_present: bool = False,
                flag_values=FLAGS) -> dict[str, Any]:  # pylint: disable=redefined-outer-name
  """{field: value} of the flags `define_flags` defined; `only_present`: only the flags that
  were given on the command line. Nested dataclass fields come back as dicts of the sub-fields
  that were set."""
  out = {}
  for name in names:
    flag = flag_values[prefix + name]
    if only_present and not flag.present:
      continue
    value = _convert(cls, name, flag.value)
    if '.' in name:
      if not flag.present and value is None:
        continue
      outer, inner = name.split('.', 1)
      out.setdefault(outer, {})[inner] = value
    else:
      out[name] = value
  return out


# ----------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------

CONFIG_FILE_SUFFIXES = ('.py', '.json')


def is_config_file(value: str | None) -> bool:
  return bool(value) and value.endswith(CONFIG_FILE_SUFFIXES)


def load_config_file(path: str) -> dict[str, Any]:
  """The dict a config file describes: a `.py` file's `get_config()` (a dict or a dataclass),
  or a `.json` file (a workdir's `train_config.json` gives its 'train' section)."""
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} does not exist')
  if path.endswith('.py'):
    namespace = runpy.run_path(path)
    if 'get_config' not in namespace:
      raise ValueError(f'config file {path!r} defines no get_config()')
    config = namespace['get_config']()
  elif path.endswith('.json'):
    with open(path) as f:
      config = json.load(f)
    if isinstance(config, dict) and 'train' in config and 'model' in config:
      config = config['train']
  else:
    raise ValueError(f'config file {path!r} must end in one of {CONFIG_FILE_SUFFIXES}')
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  if not isinstance(config, dict):
    raise ValueError(f'config file {path!r} must give a dict, got {type(config).__name__}')
  return config
