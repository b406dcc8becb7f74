"""Rollouts on Ray: ``RolloutWorker`` actors, a ``RolloutPool`` over them, versioned weight and drafter sync.

Optional (``pip install 'respec[ray]'``); nothing here is imported unless
``distributed.rollout_workers`` is set.
"""

from .config import DistributedConfig

__all__ = ["DistributedConfig"]
