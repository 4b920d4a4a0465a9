"""Healing: recover a contracted model's quality by distillation from the model it was contracted from.

``heal(student, teacher, text, ...)`` is the stage; ``iterative_contract(source, steps=K, ...)`` alternates
contraction slices and heals; ``heal_in_place`` is the hook ``pyshrink.contract(..., heal_tokens=N)`` uses.
Modules: ``losses`` (what is matched), ``trainer`` (the loop), ``checkpoint`` (atomic, resumable folders),
``report`` (the recovery-curve plot), ``api`` (inputs, checks, results), ``schedule`` (iterative contraction),
``carry`` (optimizer state across a cut), ``fade`` (neurons faded out during a heal, then cut).
"""
from __future__ import annotations

import sys

from .api import HealResult, IncompatibleModels, check_pair, heal, heal_in_place, vocab_fingerprint
from .checkpoint import CheckpointError
from .schedule import ScheduleResult, iterative_contract
from .teacher import TeacherCache

__all__ = ["heal", "HealResult", "heal_in_place", "iterative_contract", "ScheduleResult", "IncompatibleModels",
           "CheckpointError", "check_pair", "vocab_fingerprint", "TeacherCache"]


class _CallableModule(type(sys.modules[__name__])):
    """Importing ``pyshrink.heal`` binds this package on ``pyshrink``, shadowing the lazily exported function;
    calling the package calls :func:`heal`, so ``pyshrink.heal(...)`` and ``pyshrink.heal.iterative_contract``
    both work whatever was imported first."""

    def __call__(self, *args, **kwargs) -> HealResult:
        return heal(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
