"""Distributed helpers in plain ``torch.distributed``: DTensor shards (FSDP2), gathered copies and
surgery on shards (``sliced``)."""

from .dtensor import is_fsdp_module, is_sharded, local_part, local_tensor, shard_offset

__all__ = ["is_fsdp_module", "is_sharded", "local_part", "local_tensor", "shard_offset"]
