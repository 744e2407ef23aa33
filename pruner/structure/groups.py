"""The coupled structures of a decoder-only causal LM, as :func:`pruner.structure.discover` finds them.

A *family* is the groups of one kind in one place (the query heads of layer 3, say); each group
is a set of (parameter, dimension, indices) slices removed together. A layer's attention and MLP
record their producers (q/k/v, gate/up), their consumer (o_proj, down_proj) and their families;
:class:`ModelStructure` adds the residual stream's readers, writers and norms.

Example:
    >>> fam = Family("mlp_channel", 0, [Member("mlp.down_proj.weight", 1, torch.arange(4).unsqueeze(1))])
    >>> fam.num_groups, fam.params_per_group({"mlp.down_proj.weight": torch.Size([8, 4])})
    (4, 8)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedArchitectureError

GroupKind = str  # "attention_head" | "kv_group" | "mlp_channel" | "hidden_channel" | "layer"


@dataclass
class Member:
    """One parameter's share of a family of groups: group ``g`` owns ``indices[g]`` along ``dim``."""

    param: str
    dim: int
    indices: torch.Tensor  # (n_groups, k) long


@dataclass
class Family:
    """Groups of one kind in one place (e.g. the 9 query heads of layer 3), removed group-wise."""

    kind: GroupKind
    layer: int | None
    members: list[Member]

    @property
    def num_groups(self) -> int:
        return self.members[0].indices.shape[0]

    def params_per_group(self, shapes: dict[str, torch.Size]) -> int:
        """Parameters one group holds (every group of a family has the same size)."""
        total = 0
        for m in self.members:
            shape = shapes[m.param]
            other = 1
            for d, s in enumerate(shape):
                if d != m.dim:
                    other *= s
            total += m.indices.shape[1] * other
        return total


@dataclass
class AttentionInfo:
    module: str  # the attention module (lowest common ancestor of its linears)
    consumer: str  # the linear that reads all heads (o_proj)
    producers: list[str]  # q/k/v (or fused qkv) linears
    num_heads: int
    num_kv_heads: int
    head_dim: int
    heads: Family  # slices exclusive to each query head (with MHA: the whole head)
    kv_groups: Family  # slices of each key/value group and all its query heads


@dataclass
class MLPInfo:
    module: str
    consumer: str
    producers: list[str]
    num_channels: int
    channels: Family


@dataclass
class LayerInfo:
    index: int
    path: str
    attention: AttentionInfo | None
    mlp: MLPInfo | None
    readers: list[str]  # linears reading the residual stream
    writers: list[str]  # linears writing into the residual stream
    norms: list[str]  # per-channel norms on the residual stream
    attention_problem: str | None = None  # why this layer's heads cannot be removed, when they cannot


@dataclass
class ModelStructure:
    layers_path: str
    layers: list[LayerInfo]
    hidden_size: int
    embedding: str  # module path of the input embedding
    lm_head: str | None
    final_norms: list[str]
    tied_embeddings: bool
    hidden_channel_problem: str | None = None  # why channel-wise pruning is impossible, if it is
    shapes: dict[str, torch.Size] = field(default_factory=dict)

    @property
    def attention_problem(self) -> str | None:
        """Why some layer's attention heads cannot be removed (its first such layer's reason)."""
        return next((info.attention_problem for info in self.layers if info.attention_problem), None)

    def layer_parameters(self) -> int:
        """Parameters of the decoder layers (what block and layer modes can remove)."""
        prefix = self.layers_path + "."
        return sum(shape.numel() for name, shape in self.shapes.items() if name.startswith(prefix))

    def hidden_family(self) -> Family:
        if self.hidden_channel_problem:
            raise UnsupportedArchitectureError(self.hidden_channel_problem)
        idx = torch.arange(self.hidden_size).unsqueeze(1)  # (hidden, 1)
        members = [Member(f"{self.embedding}.weight", 1, idx)]
        params = set()
        for layer in self.layers:
            for name in layer.readers:
                params.add((f"{name}.weight", 1))
            for name in layer.writers:
                params.add((f"{name}.weight", 0))
                if f"{name}.bias" in self.shapes:
                    params.add((f"{name}.bias", 0))
            for name in layer.norms:
                params.update((f"{name}.{p}", 0) for p in ("weight", "bias") if f"{name}.{p}" in self.shapes)
        for name in self.final_norms:
            params.update((f"{name}.{p}", 0) for p in ("weight", "bias") if f"{name}.{p}" in self.shapes)
        if self.lm_head and not self.tied_embeddings:
            params.add((f"{self.lm_head}.weight", 1))
        members += [Member(p, d, idx) for p, d in sorted(params)]
        return Family("hidden_channel", None, members)

    def layer_family(self, layer: LayerInfo) -> Family:
        """The whole layer as one group. Members are its writers' weights and biases: zeroing
        them turns the layer into the identity, which is what removing it does."""
        members = []
        for name, shape in self.shapes.items():
            if name.startswith(layer.path + "."):
                members.append(Member(name, 0, torch.arange(shape[0]).unsqueeze(0)))
        return Family("layer", layer.index, members)


def consumer_columns(info: LayerInfo, family_name: str) -> tuple[str, torch.Tensor]:
    """(consumer weight name, (n_groups, k) column indices) of a family's groups."""
    owner = info.attention if family_name == "heads" else info.mlp
    family = owner.heads if family_name == "heads" else owner.channels
    name = f"{owner.consumer}.weight"
    member = next(m for m in family.members if m.param == name and m.dim == 1)
    return name, member.indices
