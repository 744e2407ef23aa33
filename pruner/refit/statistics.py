"""The refit's statistics: input Gram matrices of the consumers (o_proj, down_proj), the dense
outputs of the decoder layers the regional fit needs, and the loss's Fisher at the consumers'
outputs for ``mlp_selection="obs-fisher"``, gathered in forward (and, for the Fisher, backward)
passes over the refit's text.

Example:
    >>> import torch
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> collector = GramCollector(model, ["model.layers.0.mlp.down_proj"])
    >>> collect_inputs(model, [torch.randint(0, 100, (2, 8))], collector)
    >>> collector.grams["model.layers.0.mlp.down_proj"].shape  # (in, in), fp64
    torch.Size([96, 96])
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import as_batch
from ..config import PruneConfig
from ..errors import PrunerError
from ..memory import recomputing
from ..structure import ModelStructure


GRAM_ROWS = 1024  # rows of a Gram matrix formed at a time (8,192 inputs: 32 MB in fp32, not 256 + 512 MB)


class GramCollector:
    """Accumulates ``Σ x xᵀ`` of the inputs of the given linear modules (forward pre-hooks) and,
    for ``regional_epochs``, keeps the outputs of ``output_modules`` (decoder layers) of every
    forward pass, on the CPU, in order: ``outputs[name]`` = [(B, T, d) per pass]."""

    def __init__(self, model: nn.Module, module_names: list[str], output_modules: list[str] | None = None):
        self.model, self.names = model, module_names
        self.output_modules = list(output_modules or [])
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        # mlp_selection="obs-fisher": per output of each module, the summed squared gradient of
        # the text's loss (fp64, (out,)) and the tokens summed over (api.collect_output_fisher)
        self.fisher: dict[str, torch.Tensor] = {}
        self.fisher_tokens: dict[str, int] = {}
        self._handles: list = []

    def attach(self) -> None:
        for name in self.names:
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._hook(name)))
        for name in self.output_modules:
            self._handles.append(self.model.get_submodule(name).register_forward_hook(self._output_hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, args):
            if recomputing():  # activation checkpointing: this forward was counted once already
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, in)
            # On CPU the products run in fp32: about twice as fast as fp64 (2,048 x 1,536 inputs on 2
            # busy cores: 0.13 s against 0.28 s plus the cast) and within ~1e-7 of them (SmolLM2's refit:
            # the same perplexity to 8 digits); the running sum stays fp64. On a GPU fp64, since its
            # fp32 products may run in TF32 (a 10-bit mantissa).
            x = x.float() if x.device.type == "cpu" else x.double()
            n = x.shape[1]
            if name not in self.grams:
                self.grams[name] = torch.zeros(n, n, dtype=torch.float64, device=x.device)
            gram = self.grams[name]  # (in, in) fp64
            for start in range(0, n, GRAM_ROWS):  # a block of rows at a time: no in² temporary
                gram[start:start + GRAM_ROWS].add_(x[:, start:start + GRAM_ROWS].T @ x)
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return hook

    def _output_hook(self, name: str):
        def hook(module, args, out):
            if recomputing():
                return
            out = out[0] if isinstance(out, (tuple, list)) else out  # (B, T, d)
            # on the CPU: a 7B model's 28 pruned layers x 32,768 tokens are 7.5 GB in bf16
            self.outputs.setdefault(name, []).append(out.detach().to("cpu", copy=True))

        return hook


def consumers(structure: ModelStructure, cfg: PruneConfig | None = None) -> list[str]:
    """The modules that read pruned channels (o_proj, down_proj): those of the layers ``cfg``
    prunes, or of every layer when ``cfg`` is None. Only these need input statistics, and each
    costs an in_features² fp64 matrix (LLaMA-7B's down_proj: 0.97 GB), so the others are skipped."""
    names = []
    for info in structure.layers:
        if info.attention is not None and (cfg is None or cfg.prunes("attention", info.index)):
            names.append(info.attention.consumer)
        if info.mlp is not None and (cfg is None or cfg.prunes("mlp", info.index)):
            names.append(info.mlp.consumer)
    return names


class _StopForward(Exception):
    """Raised by :class:`_StopAt` once a forward pass has given all its statistics."""


class _StopAt:
    """A forward hook (pre or post) that ends the forward pass at the ``calls``-th call of its module."""

    def __init__(self, calls: int):
        self.calls, self.seen = calls, 0

    def __call__(self, module: nn.Module, args, *output) -> None:
        self.seen += 1
        if self.seen == self.calls:
            self.seen = 0
            raise _StopForward


@torch.no_grad()
def collect_inputs(model: nn.Module, batches: list, collector: GramCollector, progress: bool = False,
                   stop_early: bool = True) -> None:
    """Forward passes only: the consumers' input statistics for ``reconstruct``.

    ``stop_early``: after the first batch, each forward pass ends at the input of the consumer
    it reaches last (what follows, e.g. the last layers and the LM head, computes nothing the
    statistics need: SmolLM2's vocabulary projection alone is a fifth of a forward pass; with
    ``collector.output_modules`` at the output of the last of those it reaches). Pass
    False where the forward pass must run to its end (under FSDP2 each module reshards its
    parameters in a hook after its forward).

    Example:
        >>> from pruner.testing import tiny_causal_lm
        >>> model = tiny_causal_lm("llama")
        >>> collector = GramCollector(model, ["model.layers.0.mlp.down_proj"])
        >>> collect_inputs(model, [torch.randint(0, 100, (2, 8))] * 2, collector)
        >>> collector.tokens["model.layers.0.mlp.down_proj"]  # 2 batches of 2 x 8
        32
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # the consumers (inputs) and recorded modules (outputs) in the order the first forward pass reaches them
    reached: list[tuple[str, bool]] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: reached.append((name, False))) for name in collector.names] if stop_early else []
    handles += [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: reached.append((name, True)))
        for name in collector.output_modules] if stop_early else []
    collector.attach()
    try:
        for i, batch in enumerate(tqdm(batches, desc="reconstruction inputs", disable=not progress)):
            batch = as_batch(batch, device)
            if i == 1 and reached:  # registered after the collector's hooks: it raises once they have summed
                for h in handles:
                    h.remove()
                last, at_output = reached[-1]
                module, stop = model.get_submodule(last), _StopAt(reached.count(reached[-1]))
                handles = [module.register_forward_hook(stop) if at_output else module.register_forward_pre_hook(stop)]
            try:
                model(**{k: v for k, v in batch.items() if k != "labels"})
            except _StopForward:
                pass
    finally:
        collector.detach()
        for h in handles:
            h.remove()
        model.train(was_training)


def collect_output_fisher(model: nn.Module, batches: list, collector: GramCollector, max_samples: int) -> None:
    """Backward passes of the next-token loss over the first ``max_samples`` sequences of
    ``batches``, down to the outputs of ``collector``'s modules, for ``mlp_selection="obs-fisher"``:
    ``collector.fisher[name] += Σ_tokens (∂L/∂y)²`` per output ``y`` of each module, ``L`` the loss
    summed over the predicted tokens. The gradients are taken with respect to those outputs only:
    no weight gradient is computed and no ``.grad`` changes.

    Example:
        >>> from pruner.testing import tiny_causal_lm
        >>> model = tiny_causal_lm("llama")
        >>> collector = GramCollector(model, ["model.layers.1.mlp.down_proj"])
        >>> collect_output_fisher(model, [torch.randint(0, 100, (4, 16))], collector, max_samples=2)
        >>> collector.fisher_tokens["model.layers.1.mlp.down_proj"]  # 2 sequences of 16 tokens
        32
    """
    device = next(model.parameters()).device
    outputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: outputs.__setitem__(name, out)) for name in collector.names]
    # embeddings that need a gradient: a graph to the outputs even where every weight is frozen. A hook
    # rather than calling the embedding ourselves: under FSDP2 its weight is whole only inside the
    # model's own forward
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out.detach().requires_grad_()))  # (B, T, d)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            if seen >= max_samples:
                break
            batch = as_batch(batch, device)
            take = min(max_samples - seen, batch["input_ids"].shape[0])
            part = {k: v[:take] for k, v in batch.items()}
            with torch.enable_grad():
                logits = model(input_ids=part["input_ids"], attention_mask=part.get("attention_mask")).logits  # (B, T, V)
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), part["labels"][:, 1:].flatten(),
                                                   ignore_index=-100, reduction="sum")
                if not torch.isfinite(loss):
                    raise PrunerError("the loss of the Fisher passes is NaN/inf: check the refit's text and the "
                                      "model's dtype, or use mlp_selection='obs'")
                names = [name for name in collector.names if name in outputs]
                grads = torch.autograd.grad(loss, [outputs[name] for name in names], allow_unused=True)
            mask = part.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else part["input_ids"].numel()
            for name, grad in zip(names, grads):
                if grad is None:  # the output does not reach the loss
                    continue
                sq = grad.detach().reshape(-1, grad.shape[-1]).double().square().sum(0)  # (out,)
                collector.fisher[name] = sq if name not in collector.fisher else collector.fisher[name].add_(sq)
                collector.fisher_tokens[name] = collector.fisher_tokens.get(name, 0) + tokens
            outputs.clear()
            del logits, loss, grads
            seen += take
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
