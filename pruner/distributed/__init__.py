"""Distributed helpers in plain ``torch.distributed``: DTensor shards (FSDP2) and gathered copies."""

from .dtensor import is_sharded, local_tensor, shard_offset

__all__ = ["is_sharded", "local_tensor", "shard_offset"]
