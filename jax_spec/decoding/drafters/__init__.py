"""Drafters of the speculative loop, one module each, behind `base.Drafter` (see base.py).

Every module of this package is imported here, so a drafter registered with `@base.register` in a
new file is available by name without editing any other file.
"""
import importlib
import pkgutil

from jax_spec.decoding.drafters.base import (Candidates, Committed, Context, Drafter, Prefill, Verify,
                                             register, registered)

for _module in pkgutil.iter_modules(__path__):
  if _module.name != 'base':
    importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['Candidates', 'Committed', 'Context', 'Drafter', 'Prefill', 'Verify', 'register', 'registered']
