"""Context parallelism: attention over sequences sharded across GPUs (torch.distributed).

``shard_sequence`` / ``unshard_sequence`` move between a full tensor and each rank's part of it;
``context_parallel_attention`` computes attention on the parts, with the temperatures of the whole
sequence (``n_i`` is always the global count).
"""

from .api import context_parallel_attention, shard_sequence, unshard_sequence

__all__ = ["context_parallel_attention", "shard_sequence", "unshard_sequence"]
