"""Distributed helpers in plain ``torch.distributed``: DTensor shards (FSDP2), gathered copies,
surgery on shards (``sliced``) and the refit's copy gathered one decoder layer at a time
(``window``)."""

from .dtensor import device_mesh_of, is_fsdp_module, is_sharded, local_part, local_tensor, replica_count, shard_offset

__all__ = ["device_mesh_of", "is_fsdp_module", "is_sharded", "local_part", "local_tensor", "replica_count",
           "shard_offset"]
