"""Continuous-batching engine: sequences, KV page allocation, scheduling (pure Python)."""

from imp_jax.engine.block_manager import BlockManager
from imp_jax.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from imp_jax.engine.sequence import Sequence, SequenceStatus

__all__ = [
    "BlockManager",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
]
