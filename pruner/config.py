"""``PruneConfig``: every pruning option, validated before any work starts.

Example:
    >>> cfg = PruneConfig(target_sparsity=0.2, attention_layers=(4, 28), mlp_layers=(4, 28))
    >>> cfg.mode, cfg.criterion
    ('block', 'element1')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .checks import check_bool, check_fraction, check_int, check_number, plain
from .errors import PrunerError
from .importance.aggregation import check_aggregation
from .importance.criteria import check_criterion

MODES = ("block", "channel", "layer")


# round_to=None: whole blocks of llama.cpp's 32-wide quantization (q4_0 ... q8_0) and widths the
# SIMD / tensor-core kernels like, for layers wide enough that a 32-channel step is fine-grained
AUTO_ROUND_TO = 32
AUTO_ROUND_MIN_WIDTH = 1024

@dataclass
class PruneConfig:
    criterion: str = field(default="element1", metadata={"help": "importance criterion (see pruner.importance.CRITERIA)"})
    aggregation: str = field(default="sum", metadata={"help": "sum | mean | max | prod | last"})
    mode: Literal["block", "channel", "layer"] = field(
        default="block", metadata={"help": "block: heads + MLP channels; channel: hidden size; layer: whole layers"})
    target_sparsity: float | None = field(
        default=None, metadata={"help": "fraction of TOTAL parameters to remove (e.g. 0.2)"})
    target_scope: Literal["model", "layers"] = field(
        default="model", metadata={"help": "what target_sparsity is a fraction of: model = all parameters, "
                                           "embeddings included; layers = the decoder layers' parameters"})
    pruning_ratio: float | None = field(
        default=None, metadata={"help": "the paper's per-structure ratio (fraction of heads/channels/layers in range)"})
    attention_layers: tuple[int, int] | None = field(
        default=None, metadata={"help": "half-open [start, end) of layers whose attention is pruned; None = all"})
    mlp_layers: tuple[int, int] | None = field(
        default=None, metadata={"help": "half-open [start, end) of layers whose MLP is pruned; None = all"})
    layers: tuple[int, int] | None = field(
        default=None, metadata={"help": "layer mode: half-open range of removable layers; None = all"})
    head_granularity: Literal["query", "kv"] | None = field(
        default=None, metadata={"help": "query: remove query heads evenly inside every KV group; kv: whole KV groups; "
                                        "None (the default) = kv with global ranking, query with a ratio per layer"})
    prune_attention: bool = field(default=True, metadata={"help": "block mode: prune attention heads"})
    prune_mlp: bool = field(default=True, metadata={"help": "block mode: prune MLP channels"})
    global_ranking: bool | None = field(
        default=None, metadata={"help": "rank groups across layers by score per parameter instead of a fixed ratio per "
                                        "layer; None (the default) = True with target_sparsity, False with the paper's "
                                        "per-layer pruning_ratio or with uniform=True"})
    max_layer_ratio: float = field(
        default=0.9, metadata={"help": "global ranking: at most this fraction of a layer's heads/channels goes"})
    attention_selection: Literal["score", "measured", "obs"] = field(
        default="score", metadata={"help": "which heads / KV groups a layer loses (how many comes from the scores): "
                                           "'score' = lowest importance score (the paper), 'measured' = lowest "
                                           "calibration loss with them masked (forward passes only), 'obs' = greedy "
                                           "block Optimal Brain Surgeon on the reconstruction statistics (needs "
                                           "reconstruct=True)"})
    mlp_selection: Literal["score", "obs", "obs-fisher"] = field(
        default="score", metadata={"help": "which MLP channels a layer loses (how many comes from the scores): "
                                           "'score' = lowest importance score (the paper), 'obs' = greedy Optimal "
                                           "Brain Surgeon on the reconstruction statistics (needs reconstruct=True), "
                                           "'obs-fisher' = the same with the output error weighted by the loss's "
                                           "diagonal Fisher (backward passes over fisher_samples of the text)"})
    fisher_samples: int = field(
        default=16, metadata={"help": "mlp_selection='obs-fisher': sequences of the refit's text (the reconstruction "
                                      "batches, else the calibration batches) that also run backward for the Fisher"})
    uniform: bool = field(
        default=False, metadata={"help": "every layer keeps the same numbers of heads, KV heads and MLP channels, so "
                                         "the export is a plain config that vLLM / TGI / TensorRT-LLM load (needs "
                                         "global_ranking=False and every layer in the pruned ranges)"})
    round_to: int | None = field(
        default=None, metadata={"help": "kept MLP/hidden widths become multiples of this (1 = any width); None (the "
                                        "default) = 32 where the dense width is a multiple of 32 of at least 1024 "
                                        "(LLaMA-class models: whole GGUF quantization blocks, SIMD/tensor-core "
                                        "friendly widths), else 1"})
    reconstruct: bool = field(
        default=False, metadata={"help": "refit the kept columns of o_proj/down_proj by least squares on the "
                                         "calibration inputs (no training); costs one in_features^2 matrix per layer"})
    reconstruct_damping: float = field(default=0.1, metadata={"help": "ridge term of reconstruct (and of OBS selection), relative to the mean diagonal; 0.1 suits a few hundred calibration tokens, 0.01 tens of thousands"})
    regional_epochs: int = field(
        default=0, metadata={"help": "after the refit, train each pruned layer's MLP alone for this many epochs over "
                                     "the refit's text so that the layer gives the dense layer's output again, layer "
                                     "by layer on the pruned model's own stream (0 = off; needs reconstruct=True)"})
    regional_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of regional_epochs"})
    iterative_steps: int = field(default=1, metadata={"help": "prune in this many steps, re-estimating importance"})
    seed: int = field(default=0, metadata={"help": "seed of the random criterion and probing"})

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:  # NumPy scalars as Python numbers: checked, compared, saved alike
            value = getattr(self, name)
            setattr(self, name, tuple(plain(v) for v in value) if isinstance(value, (list, tuple)) else plain(value))
        for name in ("criterion", "aggregation"):
            if not isinstance(getattr(self, name), str):
                raise PrunerError(f"{name} must be a name (a string), got {getattr(self, name)!r}")
        check_criterion(self.criterion)
        check_aggregation(self.aggregation)
        if self.mode not in MODES:
            raise PrunerError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}")
        if (self.target_sparsity is None) == (self.pruning_ratio is None):
            raise PrunerError(
                "give exactly one of target_sparsity (fraction of total parameters to remove) or "
                f"pruning_ratio (the paper's per-structure ratio); got target_sparsity={self.target_sparsity}, "
                f"pruning_ratio={self.pruning_ratio}"
            )
        for name in ("target_sparsity", "pruning_ratio"):
            if getattr(self, name) is not None:
                check_fraction(name, getattr(self, name))
        if self.target_scope not in ("model", "layers"):
            raise PrunerError(f"target_scope must be 'model' (a fraction of all parameters) or 'layers' (of the "
                              f"decoder layers' parameters), got {self.target_scope!r}")
        if self.target_scope == "layers" and self.target_sparsity is None:
            raise PrunerError("target_scope='layers' says what target_sparsity is a fraction of, but pruning_ratio was "
                              "given: use target_sparsity=..., or leave target_scope='model'")
        if self.target_scope == "layers" and self.mode == "channel":
            raise PrunerError("target_scope='layers' counts the decoder layers' parameters, but mode='channel' shrinks "
                              "the hidden size everywhere, embeddings included: use target_scope='model'")
        for name in ("prune_attention", "prune_mlp", "reconstruct", "uniform"):
            check_bool(name, getattr(self, name))
        self.resolve_allocation_defaults()
        check_bool("global_ranking", self.global_ranking)
        if self.uniform and (self.mode != "block" or self.global_ranking):
            raise PrunerError("uniform=True keeps the same widths in every layer: it needs mode='block' and "
                              "global_ranking=False (global ranking gives each layer its own widths)")
        if self.reconstruct and self.mode != "block":
            raise PrunerError(f"reconstruct=True refits o_proj/down_proj after heads or MLP channels go; mode="
                              f"{self.mode!r} removes neither: use mode='block', or reconstruct=False")
        for option, choices, needs in (("attention_selection", ("score", "measured", "obs"), "prune_attention"),
                                       ("mlp_selection", ("score", "obs", "obs-fisher"), "prune_mlp")):
            value = getattr(self, option)
            if not isinstance(value, str) or value not in choices:
                listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
                raise PrunerError(f"{option} must be {listed}, got {value!r}")
            if value.startswith("obs") and not self.reconstruct:
                raise PrunerError(f"{option}={value!r} chooses from the input statistics of the least-squares refit: "
                                  f"set reconstruct=True (and pass reconstruction_batches for more tokens), or use "
                                  f"{option}='score'")
            if value.startswith("obs") and not (self.mode == "block" and getattr(self, needs)):
                raise PrunerError(f"{option}={value!r} re-chooses what block mode removes: it needs mode='block' with "
                                  f"{needs}=True")
        if not isinstance(self.head_granularity, str) or self.head_granularity not in ("query", "kv"):
            raise PrunerError(f"head_granularity must be 'query' or 'kv', got {self.head_granularity!r}")
        check_number("max_layer_ratio", self.max_layer_ratio, 0.0, 1.0, low_open=True,
                     fix="the largest fraction of a layer's heads/channels global ranking may remove, e.g. 0.9")
        check_number("reconstruct_damping", self.reconstruct_damping, 0.0, low_open=True,
                     fix="the refit's ridge term relative to the mean input energy, e.g. 0.1 (few tokens) or 0.01")
        if self.round_to is not None:
            check_int("round_to", self.round_to, 1, fix="kept widths become multiples of it, e.g. 1, 8 or 64, or None "
                                                        "(32 for widths of 1024 and more)")
        check_int("iterative_steps", self.iterative_steps, 1, fix="1 prunes in one step")
        check_int("regional_epochs", self.regional_epochs, 0, fix="epochs of the regional fit, e.g. 2, or 0 for none")
        check_number("regional_lr", self.regional_lr, 0.0, low_open=True, fix="the regional fit's AdamW rate, e.g. 1e-3")
        if self.regional_epochs and not self.reconstruct:
            raise PrunerError("regional_epochs fits the pruned MLPs on the refit's text and the dense outputs its "
                              "statistics pass records: set reconstruct=True (with reconstruction_batches), or "
                              "regional_epochs=0")
        if self.regional_epochs and self.iterative_steps != 1:
            raise PrunerError(f"regional_epochs needs the dense model's outputs, recorded in a one-step prune: use "
                              f"iterative_steps=1 (got {self.iterative_steps}), or regional_epochs=0")
        check_int("fisher_samples", self.fisher_samples, 1, fix="sequences run backward for mlp_selection='obs-fisher', "
                                                                "e.g. 16")
        check_int("seed", self.seed, 0, fix="any non-negative integer, e.g. 0")
        if self.mode == "block" and not (self.prune_attention or self.prune_mlp):
            raise PrunerError("block mode with prune_attention=False and prune_mlp=False removes nothing")
        for name in ("attention_layers", "mlp_layers", "layers"):
            r = getattr(self, name)
            if r is not None:
                if isinstance(r, (str, bytes)) or not hasattr(r, "__len__"):
                    raise PrunerError(f"{name} must be a (start, end) pair of integers, got {r!r}")
                r = tuple(r)
                if len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
                    raise PrunerError(f"{name} must be a (start, end) pair of integers, got {r!r}")
                if r[0] >= r[1] or r[0] < 0:
                    raise PrunerError(f"{name}={r} is empty or negative: use (start, end) with 0 <= start < end")
                setattr(self, name, r)

    def resolve_allocation_defaults(self) -> None:
        """``global_ranking`` / ``head_granularity`` left at None become the allocation that pruned best
        in our measurements (docs/results.md): whole KV groups and MLP channels ranked across
        layers by score per parameter. A ``pruning_ratio`` is the paper's per-layer ratio, and
        ``uniform`` needs equal layers, so both keep a ratio per layer (query heads inside every
        KV group, as the paper).

        Example:
            >>> c = PruneConfig(target_sparsity=0.2)
            >>> c.global_ranking, c.head_granularity
            (True, 'kv')
            >>> c = PruneConfig(pruning_ratio=0.25)
            >>> c.global_ranking, c.head_granularity
            (False, 'query')
        """
        if self.global_ranking is None:
            self.global_ranking = self.target_sparsity is not None and not self.uniform
        if self.head_granularity is None:
            self.head_granularity = "kv" if self.global_ranking is True else "query"

    def check_model(self, num_layers: int) -> None:
        """Checks the layer ranges against a model with ``num_layers`` layers."""
        for name in ("attention_layers", "mlp_layers", "layers"):
            r = getattr(self, name)
            if r is not None and r[1] > num_layers:
                raise PrunerError(
                    f"{name}={r} reaches past the model's {num_layers} layers: use an end <= {num_layers}")
        if self.uniform:
            for name, flag in (("attention_layers", self.prune_attention), ("mlp_layers", self.prune_mlp)):
                r = getattr(self, name)
                if flag and r is not None and tuple(r) != (0, num_layers):
                    raise PrunerError(f"uniform=True prunes every layer alike, but {name}={r} leaves some layers "
                                      f"whole: use {name}=None (or (0, {num_layers})), or uniform=False")

    def rounding(self, width: int) -> int:
        """The multiple a kept width of ``width`` channels is rounded to: ``round_to``, or for None
        32 when ``width`` is a multiple of 32 of at least 1024 (a 32-channel step is then at most
        3 % of the layer; whole GGUF quantization blocks and kernel-friendly widths; what it costs
        and gains: docs/results.md), else 1.

        Example:
            >>> PruneConfig(target_sparsity=0.2).rounding(1536), PruneConfig(target_sparsity=0.2).rounding(96)
            (32, 1)
        """
        if self.round_to is not None:
            return self.round_to
        return AUTO_ROUND_TO if width >= AUTO_ROUND_MIN_WIDTH and width % AUTO_ROUND_TO == 0 else 1

    def prunes(self, kind: Literal["attention", "mlp"], layer: int) -> bool:
        """Whether block mode prunes this layer's attention heads or MLP channels."""
        flag, r = ((self.prune_attention, self.attention_layers) if kind == "attention"
                   else (self.prune_mlp, self.mlp_layers))
        return self.mode == "block" and flag and (r is None or r[0] <= layer < r[1])

    @property
    def measures_attention(self) -> bool:
        """Whether attention removals are re-chosen by measured calibration loss."""
        return self.mode == "block" and self.prune_attention and self.attention_selection == "measured"

    def to_dict(self) -> dict:
        return asdict(self)
