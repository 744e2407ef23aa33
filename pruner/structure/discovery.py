"""Automatic discovery of coupled structures by *dependency probing*.

No module names are listed per architecture. For every decoder layer we re-run the layer with
each ``nn.Linear`` replaced by a random leaf tensor (no matmul, so probing costs almost nothing)
and ask autograd which output channels of which linears each linear's *input* channels depend on
through channel-preserving (linear-free) paths:

* a linear whose input depends on the layer's input reads the residual stream (q/k/v, gate/up);
* a linear whose input depends on other linears' outputs is a *consumer* (o_proj, down_proj),
  and the channel-level dependency matrix between its input columns and its producers' output
  rows gives the coupled groups: connected components of that bipartite graph;
* a consumer whose every input channel has its own producer rows is MLP-like (one group per
  channel, also for a fused ``gate_up_proj``);
* otherwise it is attention: probing with a single token (softmax over one key is constant)
  leaves only the value path, probing with several tokens adds the query/key paths. Consumer
  channels with the same query/key dependencies form a query head; a connected component is a
  key/value group (GQA) and query heads inside it share its key/value rows.

Every discovered group is validated by the tests' masking check: zeroing its slices in the
original model gives the same logits as removing it.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> structure = discover(LlamaForCausalLM(cfg))
    >>> a = structure.layers[0].attention
    >>> (a.num_heads, a.num_kv_heads, a.head_dim, structure.layers[0].mlp.num_channels)
    (4, 2, 16, 96)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from .groups import AttentionInfo, Family, LayerInfo, Member, MLPInfo, ModelStructure
from .layers import find_layer_stack, layer_signature, probed_layers

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")  # how attention modules name their head count


class _Captured(Exception):
    """Raised by the last capture hook: the rest of the forward pass is not needed."""


def _capture_layer_inputs(model, layers: nn.ModuleList, seq_len: int, needed: set[int]) -> list[tuple[tuple, dict]]:
    """The inputs (args, kwargs) of the ``needed`` layers in a forward pass of a few tokens; the
    pass stops at the last of them, so later layers never run (they may even be on the meta
    device, as in benchmarks/prune_cost.py's LLaMA-70B-shaped structure)."""
    captured: list = [None] * len(layers)
    handles = []

    def hook(i):
        def record(module, args, kwargs):
            captured[i] = (args, dict(kwargs))
            if all(captured[j] is not None for j in needed):
                raise _Captured

        return record

    for i in needed:
        handles.append(layers[i].register_forward_pre_hook(hook(i), with_kwargs=True))
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(seq_len).unsqueeze(0) % vocab + 1  # (1, T)
    ids = ids.to(model.get_input_embeddings().weight.device)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def _batched(value, batch: int):
    """Expands batch-1 tensors of a layer's inputs to ``batch`` rows (others broadcast)."""
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == 1 and value.is_floating_point():
        return value.expand(batch, *value.shape[1:])
    return value


class _Probe:
    """Runs one decoder layer with every linear replaced by a random leaf (no matmul)."""

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Linear], seed: int):
        self.layer, self.linears = layer, linears
        self.generator = torch.Generator().manual_seed(seed)

    def run(self, inputs: tuple[tuple, dict], batch: int, stop_at: str | None = None,
            watch: dict[str, nn.Module] | None = None):
        """The layer on ``batch`` noisy copies of its input; with ``stop_at``, only until that
        linear receives its input (what comes after it is not needed, nor computed). ``watch``:
        other modules whose inputs are recorded too (in ``inputs_of``)."""
        args, kwargs = inputs
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = (hidden.detach().expand(batch, *hidden.shape[1:]).clone()
                  + 0.1 * torch.randn(batch, *hidden.shape[1:], generator=self.generator).to(hidden))
        hidden.requires_grad_(True)
        leaves: dict[str, torch.Tensor] = {}
        inputs_of: dict[str, torch.Tensor] = {}

        def fake(name, lin):
            def forward(x):
                inputs_of[name] = x
                if name == stop_at:
                    raise _Captured
                out = torch.randn(*x.shape[:-1], lin.out_features, generator=self.generator)
                leaves[name] = out.to(x).requires_grad_(True)
                return leaves[name].clone()  # not the leaf itself: a layer may add into it in place (Falcon)

            return forward

        for name, lin in self.linears.items():
            lin.forward = fake(name, lin)
        handles = [module.register_forward_pre_hook(lambda _m, args, name=name: inputs_of.__setitem__(name, args[0]))
                   for name, module in (watch or {}).items()]
        out = None
        try:
            rest_args = tuple(_batched(a, batch) for a in args[1:])
            rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            out = self.layer(hidden, *rest_args, **rest_kwargs)
        except _Captured:
            pass
        finally:
            for lin in self.linears.values():
                del lin.forward
            for handle in handles:
                handle.remove()
        out = out[0] if isinstance(out, tuple) else out
        return hidden, leaves, inputs_of, out


def _grads(output: torch.Tensor, wrt: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(output, wrt, allow_unused=True, retain_graph=True))


def _nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def _producer_deps(probe: _Probe, inputs, consumer: str, producers: list[str], masks: torch.Tensor) -> torch.Tensor:
    """One probe run with a batch row per mask: boolean (len(masks), sum of producer widths),
    row r says which producer rows the consumer input channels selected by ``masks[r]`` depend on."""
    _, leaves, inputs_of, _ = probe.run(inputs, len(masks), stop_at=consumer)
    x = inputs_of[consumer]  # (B, T, n_in)
    picked = (x * masks.unsqueeze(1).to(x)).sum()
    grads = _grads(picked, [leaves[p] for p in producers])
    per_producer = [
        (g.abs().sum(1) > 0) if g is not None else torch.zeros(len(masks), probe.linears[p].out_features,
                                                               dtype=torch.bool)
        for g, p in zip(grads, producers)
    ]  # each (B, out_p)
    return torch.cat([d.cpu() for d in per_producer], dim=1)


def _one_to_one_dependencies(probe: _Probe, inputs, consumer: str, producers: list[str], n_in: int,
                             checks: int = 32) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dependency matrix when every producer row feeds at most one consumer channel (an MLP),
    found by group testing in ONE probe run instead of one batch row per channel: batch row b
    sums the channels whose index has bit b set, so each producer row's dependence pattern spells
    the index of its channel. ``checks`` random subsets of channels then verify the decoded
    matrix exactly; None when it does not hold (attention: a query row feeds a whole head), and
    the caller probes channel by channel. Returns the dependencies as (channel, producer row)
    index pairs: the dense matrix would be 28,672 x 57,344 booleans for LLaMA-70B's MLP."""
    bits = max(1, (n_in - 1).bit_length())
    index = torch.arange(n_in)
    g = torch.Generator().manual_seed(n_in)
    subsets = torch.rand(checks, n_in, generator=g) < 0.5
    masks = torch.cat([((index.unsqueeze(0) >> torch.arange(bits).unsqueeze(1)) & 1).bool(),  # (bits, n_in)
                       torch.ones(1, n_in, dtype=torch.bool), subsets])
    dep = _producer_deps(probe, inputs, consumer, producers, masks)  # (bits + 1 + checks, P)
    used = dep[bits]  # (P,) rows that feed some channel
    if bool((dep[:bits] & ~used).any()):
        return None
    channel = (dep[:bits].long() << torch.arange(bits).unsqueeze(1)).sum(0)  # (P,) decoded channel of each row
    if bool((channel[used] >= n_in).any()):
        return None
    predicted = subsets[:, channel.clamp_max(n_in - 1)] & used  # (checks, P)
    if not torch.equal(predicted, dep[bits + 1:]):
        return None
    rows = used.nonzero().squeeze(1)
    return channel[rows], rows


def _channel_dependencies(probe: _Probe, inputs, consumer: str, producers: list[str], n_in: int,
                          chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Which producer rows each consumer input channel depends on, as (channel, row) index
    pairs sorted by channel, then row (rows numbered across the producers, in order)."""
    pairs = _one_to_one_dependencies(probe, inputs, consumer, producers, n_in)
    if pairs is None:
        dense = torch.cat([_producer_deps(probe, inputs, consumer, producers,
                                          torch.arange(start, min(start + chunk, n_in)).unsqueeze(1)
                                          == torch.arange(n_in))
                           for start in range(0, n_in, chunk)])  # (n_in, P)
        pairs = dense.nonzero(as_tuple=True)
    channel, row = pairs
    order = torch.argsort(channel * (int(row.max()) + 1 if len(row) else 1) + row)
    return channel[order], row[order]


def _dense(pairs: tuple[torch.Tensor, torch.Tensor], n_in: int, n_p: int) -> torch.Tensor:
    out = torch.zeros(n_in, n_p, dtype=torch.bool)
    out[pairs] = True
    return out


def _components(c_idx: torch.Tensor, p_idx: torch.Tensor, n_c: int, n_p: int) -> torch.Tensor:
    """Connected components of the bipartite graph with edges (c_idx, p_idx) (consumer channel,
    producer row); returns a component label per consumer channel (the smallest channel in it)."""
    label_c = torch.arange(n_c)
    big = torch.full((n_p,), n_c, dtype=torch.long)
    while True:
        label_p = big.scatter_reduce(0, p_idx, label_c[c_idx], "amin")
        new_c = label_c.scatter_reduce(0, c_idx, label_p[p_idx], "amin")
        if torch.equal(new_c, label_c):
            return label_c
        label_c = new_c


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        prefix.append(tokens[0])
    return ".".join(prefix)


def _rows_member(param_module: str, lin: nn.Linear, rows: torch.Tensor) -> list[Member]:
    members = [Member(f"{param_module}.weight", 0, rows)]
    if lin.bias is not None:
        members.append(Member(f"{param_module}.bias", 0, rows))
    return members


def _split_rows(group: torch.Tensor, row: torch.Tensor, n_groups: int, offsets: list[int], producers: list[str]):
    """Maps (group, producer row) pairs, sorted by group then row, to per-producer row matrices
    (n_groups, k), ascending; every group must own the same number of rows of each producer."""
    result = {}
    for p, (lo, hi) in zip(producers, zip(offsets[:-1], offsets[1:])):
        inside = (row >= lo) & (row < hi)
        counts = torch.bincount(group[inside], minlength=n_groups)
        if bool((counts != counts[0]).any()):
            raise UnsupportedArchitectureError(
                f"{p}: its rows are coupled unevenly to the groups of its consumer (counts "
                f"{sorted(set(counts.tolist()))}); this layout cannot be pruned by whole groups"
            )
        k = int(counts[0])
        if k:
            result[p] = (row[inside] - lo).view(n_groups, k)  # pairs are sorted: ascending per group
    return result


def _same_rows(rows: torch.Tensor) -> torch.Tensor:
    """Labels rows of a boolean matrix by equality (equal rows, equal label), without sorting
    whole rows: a random projection names each distinct row, then every row is compared with
    the first row of its label, so an (unlikely) collision cannot merge different rows."""
    weights = torch.rand(rows.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = rows.double() @ weights  # (n,)
    _, label = torch.unique(keys, return_inverse=True)
    first = torch.full((int(label.max()) + 1,), rows.shape[0], dtype=torch.long).scatter_reduce(
        0, label, torch.arange(rows.shape[0]), "amin")
    if not torch.equal(rows, rows[first[label]]):
        raise UnsupportedArchitectureError("could not separate the attention heads' query/key dependencies")
    return label


def _analyse_consumer(layer_idx, prefix, probe, inputs_multi, inputs_single, consumer, producers, linears):
    lin_c = linears[consumer]
    n_in = lin_c.in_features
    widths = [linears[p].out_features for p in producers]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    n_p = offsets[-1]
    pairs = _channel_dependencies(probe, inputs_multi, consumer, producers, n_in)  # (channel, row) pairs
    unfed = torch.bincount(pairs[0], minlength=n_in) == 0
    if bool(unfed.any()):
        bad = int(unfed.nonzero()[0])
        raise UnsupportedArchitectureError(f"{prefix}{consumer}: input channel {bad} depends on none of {producers}")
    labels = _components(*pairs, n_in, n_p)
    module = _common_prefix([consumer, *producers])
    full = lambda n: f"{prefix}{n}"  # noqa: E731
    comp_ids = labels.unique()

    if len(comp_ids) == n_in:  # every consumer channel its own group: MLP channels
        rows = _split_rows(*pairs, n_in, offsets, producers)
        members = [Member(f"{full(consumer)}.weight", 1, torch.arange(n_in).unsqueeze(1))]
        for p in producers:
            if p in rows:
                members = _rows_member(full(p), linears[p], rows[p]) + members
        channels = Family("mlp_channel", layer_idx, members)
        return "mlp", MLPInfo(full(module), full(consumer), [full(p) for p in producers], n_in, channels)

    # attention: single-token probe keeps only the value path
    dep = _dense(pairs, n_in, n_p)  # (n_in, P): n_in is heads x head_dim here, not the MLP width
    dep_value = _dense(_channel_dependencies(probe, inputs_single, consumer, producers, n_in), n_in, n_p)
    query_key = dep & ~dep_value  # (n_in, P) dependencies through attention scores only
    # query heads: consumer channels with identical query/key dependency sets
    head_of = _same_rows(query_key)
    head_first = torch.full((int(head_of.max()) + 1,), n_in, dtype=torch.long).scatter_reduce(
        0, head_of, torch.arange(n_in), "amin")
    order = head_first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))  # head label -> head number (by first channel)
    n_heads = len(order)
    declared = _declared_heads(probe.layer.get_submodule(module) if module else probe.layer)
    if declared is not None and declared > n_heads:
        # fewer heads than the module computes: something mixes them before the scores (OLMo 2's
        # q_norm / k_norm normalise the whole projection), so no head can go alone exactly
        return "coupled", (f"{full(module)}: its {declared} attention heads are coupled (the probe finds {n_heads} "
                           f"independent group{'s' if n_heads > 1 else ''}; e.g. OLMo 2's q_norm/k_norm normalise "
                           "the whole query/key projection), so heads cannot be removed exactly; its MLP channels and "
                           "whole layers can (prune_attention=False)")
    head_dim = n_in // n_heads
    if n_in % n_heads or not torch.equal(rank[head_of], torch.arange(n_in) // head_dim):
        raise UnsupportedArchitectureError(
            f"{full(consumer)}: attention heads are not contiguous blocks of equal size in its input; "
            "this attention layout is not supported"
        )
    heads = torch.arange(n_in).view(n_heads, head_dim)  # (n_heads, head_dim) consumer channels
    n_kv = len(comp_ids)
    n_rep = n_heads // n_kv if n_heads % n_kv == 0 else 0
    if not n_rep or not torch.equal(labels, (torch.arange(n_in) // (n_rep * head_dim)) * (n_rep * head_dim)):
        raise UnsupportedArchitectureError(
            f"{full(consumer)}: key/value groups do not hold consecutive query heads evenly "
            f"({n_heads} heads, {n_kv} groups); this attention layout is not supported"
        )
    groups = torch.arange(n_in).view(n_kv, n_rep * head_dim)  # (n_kv, n_rep * head_dim) consumer channels
    # rows exclusive to a head: every consumer channel that depends on them lies in the head
    head_any = dep.view(n_heads, head_dim, -1).any(1)  # (n_heads, P)
    head_rows = (head_any & (head_any.sum(0) == 1)).nonzero(as_tuple=True)
    group_rows = dep.view(n_kv, n_rep * head_dim, -1).any(1).nonzero(as_tuple=True)  # (n_kv, P) -> pairs
    head_members = [Member(f"{full(consumer)}.weight", 1, heads)]
    group_members = [Member(f"{full(consumer)}.weight", 1, groups)]
    for p, rows in _split_rows(*head_rows, n_heads, offsets, producers).items():
        head_members = _rows_member(full(p), linears[p], rows) + head_members
    for p, rows in _split_rows(*group_rows, n_kv, offsets, producers).items():
        group_members = _rows_member(full(p), linears[p], rows) + group_members
    info = AttentionInfo(
        module=full(module), consumer=full(consumer), producers=[full(p) for p in producers],
        num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
        heads=Family("attention_head", layer_idx, head_members),
        kv_groups=Family("kv_group", layer_idx, group_members),
    )
    return "attention", info


def _declared_heads(attention: nn.Module) -> int | None:
    """The query-head count an attention module says it computes (its attribute or config)."""
    for attr in HEAD_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            return getattr(attention, attr)
    value = getattr(getattr(attention, "config", None), "num_attention_heads", None)
    return value if isinstance(value, int) else None


def _projected(t: torch.Tensor) -> torch.Tensor:
    """A random projection of ``t`` to a scalar: its gradient is zero only where ``t`` does not
    depend on the input (a plain sum is constant after a norm without weight, e.g. OLMo's)."""
    return (t * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())).to(t)).sum()


def _analyse_layer(index: int, path: str, layer: nn.Module, inputs_multi, inputs_single, hidden_size: int,
                   seed: int) -> LayerInfo:
    prefix = f"{path}."
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    unknown = [n for n, m in layer.named_modules() if type(m).__name__ in ("Conv1D",)]
    if unknown:
        raise UnsupportedArchitectureError(f"{prefix}{unknown[0]}: Conv1D projections are not supported; pruner handles decoder-only "
            "models whose projections are nn.Linear (Llama, Mistral, Qwen2, Glm, Phi3 and alike)")
    if not linears:
        raise UnsupportedArchitectureError(f"{path} has no nn.Linear modules: nothing to prune")
    probe = _Probe(layer, linears, seed)
    candidates = {n: m for n, m in layer.named_modules()  # per-channel norms as wide as the residual stream
                  if not isinstance(m, nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor)
                  and m.weight.dim() == 1 and m.weight.shape[0] == hidden_size}
    hidden, leaves, inputs_of, out = probe.run(inputs_multi, 1, watch=candidates)
    idle = [n for n in linears if n not in leaves]
    if idle:  # held by the layer but never called in its forward: nothing tells what it couples to
        raise UnsupportedArchitectureError(
            f"{prefix}{idle[0]} is an nn.Linear that {path}'s forward never calls (of {len(idle)} such): pruner cannot "
            "tell which structure it belongs to; remove it from the layer or call it in forward")
    names = list(linears)
    wrt = [hidden] + [leaves[n] for n in names]
    # writers: linears whose output reaches the layer output (the residual stream)
    g_out = _grads(_projected(out), wrt)
    writers = [n for n, gm in zip(names, g_out[1:]) if _nonzero(gm)]
    readers, producers_of = [], {}
    for n in names:
        g = _grads(_projected(inputs_of[n]), wrt)
        # the residual stream is the layer input plus what writers added to it
        reads_residual = _nonzero(g[0]) or any(_nonzero(gm) for m, gm in zip(names, g[1:]) if m in writers)
        sources = [m for m, gm in zip(names, g[1:]) if _nonzero(gm) and m not in writers]
        if reads_residual and sources:
            raise UnsupportedArchitectureError(
                f"{prefix}{n}: reads both the residual stream and {sources} without a linear in between; "
                "this layer structure is not supported"
            )
        if reads_residual:
            readers.append(n)
        elif sources:
            producers_of[n] = sources
        else:
            raise UnsupportedArchitectureError(f"{prefix}{n}: its input depends on nothing the probe can see")
    consumed = [p for ps in producers_of.values() for p in ps]
    for n in names:
        if n not in writers and n not in consumed:
            raise UnsupportedArchitectureError(
                f"{prefix}{n}: its output neither feeds another projection nor the residual stream "
                "(e.g. a router or gate of a mixture of experts); this layer is not supported"
            )
        if consumed.count(n) > 1:
            raise UnsupportedArchitectureError(f"{prefix}{n}: its output feeds several projections; not supported")
    attention = mlp = None
    attention_problem = None
    for consumer, producers in producers_of.items():
        kind, info = _analyse_consumer(index, prefix, probe, inputs_multi, inputs_single, consumer, producers, linears)
        if kind == "coupled":
            attention_problem = info
        elif kind == "attention":
            if attention is not None:
                raise UnsupportedArchitectureError(f"{path}: more than one attention block per layer is not supported")
            attention = info
        else:
            if mlp is not None:
                raise UnsupportedArchitectureError(f"{path}: more than one MLP per layer is not supported")
            mlp = info
    for n in readers:
        if linears[n].in_features != hidden_size:
            raise UnsupportedArchitectureError(f"{prefix}{n} reads the residual stream but has "
                                               f"{linears[n].in_features} inputs, not hidden size {hidden_size}")
    # on the residual stream: fed by the layer input or the writers' outputs only (OLMo 2's
    # q_norm is as wide as the stream when heads x head_dim = hidden, but reads q_proj)
    norms = []
    for n in candidates:
        if n not in inputs_of:
            continue  # never called
        g = _grads(_projected(inputs_of[n]), wrt)
        if not any(_nonzero(gm) for m, gm in zip(names, g[1:]) if m not in writers):
            norms.append(n)
    return LayerInfo(index, path, attention, mlp, [prefix + r for r in readers], [prefix + w for w in writers],
                     [prefix + n for n in norms], attention_problem)


def discover(model: nn.Module, seed: int = 0, probe_every_layer: bool = False) -> ModelStructure:
    """Finds every coupled structure of a Hugging Face decoder-only causal LM by probing.

    Raises :class:`UnsupportedArchitectureError` naming the module and the reason when a layer
    has a structure that cannot be pruned safely; nothing in the model is changed. Layers of the
    same class and shapes are probed once unless ``probe_every_layer``.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedArchitectureError(f"discover() needs a torch.nn.Module (a transformers causal LM), got "
                                           f"{type(model).__name__}: load it first, e.g. pruner.load_model(...)")
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no input embedding: not a causal LM")
    if model.get_output_embeddings() is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no output (lm_head) layer: load it with AutoModelForCausalLM, "
            "not AutoModel")
    layers_path, layers = find_layer_stack(model)
    embedding = model.get_input_embeddings()
    hidden_size = embedding.weight.shape[1]
    was_training = model.training
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        signatures = [layer_signature(layer) for layer in layers]
        needed = set(range(len(layers))) if probe_every_layer else probed_layers(layers)
        inputs_multi = _capture_layer_inputs(model, layers, 4, needed)
        inputs_single = _capture_layer_inputs(model, layers, 1, needed)
        infos = []
        analysed: dict[tuple, LayerInfo] = {}
        for i, layer in enumerate(layers):
            if i not in needed:
                infos.append(_relocate(analysed[signatures[i]], i, f"{layers_path}.{i}"))
                continue
            if inputs_multi[i] is None:
                raise UnsupportedArchitectureError(f"{layers_path}.{i} was not called in a forward pass")
            with torch.enable_grad():
                infos.append(_analyse_layer(i, f"{layers_path}.{i}", layer, inputs_multi[i], inputs_single[i],
                                            hidden_size, seed + i))
            analysed.setdefault(signatures[i], infos[-1])
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)

    names = {id(m): n for n, m in model.named_modules()}
    embedding_name = names[id(embedding)]
    head = model.get_output_embeddings()
    head_name = names[id(head)]
    tied = head.weight is embedding.weight
    final_norms = [
        n for n, m in model.named_modules()
        if not n.startswith(layers_path + ".") and n != layers_path and not isinstance(m, (nn.Linear, nn.Embedding))
        and getattr(m, "weight", None) is not None and isinstance(m.weight, torch.Tensor)
        and m.weight.dim() == 1 and m.weight.shape[0] == hidden_size
    ]
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    problem = _hidden_channel_problem(model, infos, final_norms, hidden_size) or _embedding_problem(
        model, inputs_multi[0], seq_len=4)
    return ModelStructure(layers_path, infos, hidden_size, embedding_name, head_name, final_norms, tied,
                          problem, shapes)


def _relocate(info: LayerInfo, index: int, path: str) -> LayerInfo:
    """``info`` of one layer, renamed for the identical layer ``index`` at ``path``."""
    old = info.path + "."
    rename = lambda name: path + "." + name[len(old):]  # noqa: E731

    def family(f: Family) -> Family:
        return Family(f.kind, index, [Member(rename(m.param), m.dim, m.indices) for m in f.members])

    a, m = info.attention, info.mlp
    attention = mlp = None
    if a is not None:
        attention = AttentionInfo(rename(a.module), rename(a.consumer), [rename(p) for p in a.producers],
                                  a.num_heads, a.num_kv_heads, a.head_dim, family(a.heads), family(a.kv_groups))
    if m is not None:
        mlp = MLPInfo(rename(m.module), rename(m.consumer), [rename(p) for p in m.producers], m.num_channels,
                      family(m.channels))
    problem = info.attention_problem.replace(info.path + ".", path + ".") if info.attention_problem else None
    return LayerInfo(index, path, attention, mlp, [rename(r) for r in info.readers],
                     [rename(w) for w in info.writers], [rename(n) for n in info.norms], problem)


def _hidden_channel_problem(model, infos: list[LayerInfo], final_norms: list[str], hidden: int) -> str | None:
    modules = dict(model.named_modules())
    for info in infos:
        for name in info.norms:
            if "RMSNorm" not in type(modules[name]).__name__:
                return (f"{name} is a {type(modules[name]).__name__}: channel-wise (hidden) pruning is exact only "
                        "for RMSNorm models; use mode='block' or mode='layer'")
        if len(info.norms) == 0:
            return f"{info.path} has no per-channel norm on the residual stream; channel-wise pruning unsupported"
    if not final_norms:
        return "no final norm found before the lm_head; channel-wise pruning unsupported"
    for info in infos:
        for w in info.writers:
            if modules[w].out_features != hidden:
                return f"{w} writes {modules[w].out_features} channels into a residual stream of {hidden}"
    for name in [n for info in infos[:1] for n in info.norms] + final_norms:
        problem = _norm_problem(name, modules[name], hidden)
        if problem:
            return problem
    return None


@torch.no_grad()
def _norm_problem(name: str, norm: nn.Module, hidden: int) -> str | None:
    """Channel-wise pruning rescales an RMSNorm's weight and eps so that it stays exact; that only
    holds for ``weight * x / sqrt(mean(x^2) + eps)``. Measured on the module itself, not read from
    its class name: Gemma's norm, ``(1 + weight) * ...``, has the name but not the formula."""
    eps = next((getattr(norm, a) for a in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(norm, a, None), float)), None)
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.is_meta:
        return None  # no values to check on (a meta-device model cannot be pruned channel-wise anyway)
    if eps is None or weight is None:
        return f"{name}: cannot find the RMSNorm's eps and weight; channel-wise pruning unsupported"
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(0)).to(weight)
    expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)
    if not torch.allclose(norm(x), expected, rtol=1e-3, atol=1e-5):
        return (f"{name} ({type(norm).__name__}) does not compute weight * x / rms(x) (Gemma's norms scale by "
                "1 + weight): channel-wise pruning could not stay exact; use mode='block' or mode='layer'")
    return None


@torch.no_grad()
def _embedding_problem(model, first_layer_inputs, seq_len: int) -> str | None:
    """Channel-wise pruning keeps embeddings as they are; a model that rescales them by something
    of the hidden size (Gemma: sqrt(hidden_size)) before the first layer would change."""
    if first_layer_inputs is None:
        return None
    args, kwargs = first_layer_inputs
    hidden = args[0] if args else kwargs.get("hidden_states")
    embedding = model.get_input_embeddings()
    ids = (torch.arange(seq_len).unsqueeze(0) % embedding.weight.shape[0] + 1).to(embedding.weight.device)
    if hidden is None or not torch.allclose(hidden, embedding(ids).to(hidden.dtype), rtol=1e-4, atol=1e-6):
        return ("the model rescales its token embeddings before the first layer (Gemma by sqrt(hidden_size), "
                "Granite by embedding_multiplier), which channel-wise pruning cannot keep exact: use mode='block' or "
                "mode='layer'")
    return None
