"""The estimator that accumulates importance from calibration data, for any registered criterion.

Per-parameter saliences are reduced as early as possible to *per-index vectors*: for a weight
``W`` (out, in) and a group dimension ``dim``, the salience of every row (dim 0) or column
(dim 1) summed over the other dimension (:mod:`pruner.importance.criteria` says how each
criterion computes it). A group's score then sums these vectors over its indices. Gradients
arrive through post-accumulate-grad hooks:

* first-order criteria keep one fp32 running sum of gradients per parameter (the size of the
  usual ``.grad`` buffer) and free ``.grad`` at once, so nothing else of model size is held;
* second-order (Fisher) terms are reduced to per-index vectors inside the hook, sample by
  sample, so they cost no model-sized memory at all;
* ``activation`` needs no gradients: forward pre-hooks accumulate input-channel norms;
* ``direct_linear=True`` (first-order sums only): a ``nn.Linear`` weight used by one module
  stops requiring gradients; its input and output gradient are caught by hooks and
  ``sum += alpha * dy^T x`` is one ``addmm_`` into the running sum, the same product autograd
  would form, without a fresh ``.grad`` buffer per backward and a second pass to add it.

Example:
    >>> from pruner.structure import discover
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> est = ImportanceEstimator(model, [discover(model).layers[0].mlp.channels], "l1")
    >>> est.vectors()[("model.layers.0.mlp.down_proj.weight", 1)].shape
    torch.Size([96])
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed.dtensor import local_tensor, replica_count, shard_offset
from ..errors import PrunerError
from ..memory import recomputing
from ..structure import Family
from .criteria import ParameterStatistics, check_criterion, reduce_except


def _input_requiring_grad(module: nn.Module, args: tuple):
    """Forward pre-hook of a directly accumulated Linear: an input that does not require
    gradients (nothing upstream is scored) becomes a leaf that does, so that autograd still
    delivers the output gradient the weight's sum is formed from."""
    x = args[0]
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and not x.requires_grad and x.is_floating_point():
        return (x.detach().requires_grad_(), *args[1:])
    return None


class ImportanceEstimator:
    """Accumulates importance for the given group families from calibration batches.

    Drive it around your own forward/backward (the core's :func:`pruner.prune` and the Lightning
    callback both do)::

        est = ImportanceEstimator(model, families, "element1")
        est.attach()
        for batch in batches:
            est.begin_batch(num_samples=batch.shape[0])
            model(input_ids=batch, labels=batch).loss.backward()
        est.detach()
        vectors = est.vectors()

    Weights never change. Parameters outside the families stop requiring gradients while
    attached (less memory and compute) and are restored afterwards.
    """

    def __init__(self, model: nn.Module, families: list[Family], criterion: str, seed: int = 0,
                 sharded: bool = False, direct_linear: bool = False, one_pass: bool = False):
        self.model, self.families, self.criterion = model, families, check_criterion(criterion)
        self.seed = seed
        # sharded (FSDP2): gradients arrive already reduce-scattered into each rank's shard, not
        # through autograd accumulation, so hooks would never fire: the caller calls
        # accumulate_gradients() after each backward, and vectors() are per-rank partial sums that
        # the caller all-reduces (see StructuralPruneCallback).
        self.sharded = sharded
        # direct_linear: see the module docstring. Off by default: it needs plain autograd around
        # the model (no DDP reducer waiting for those weights' .grad, no activation checkpointing
        # re-running the hooks, no autocast changing dtypes between forward and backward).
        self.direct_linear = direct_linear and not sharded
        # one_pass: the calibration is ONE backward, so each scored weight's gradient is reduced to its
        # per-index vectors as soon as it is produced and no running sum of model size is kept (4
        # bytes a scored parameter otherwise); a second backward is refused
        self.one_pass = one_pass and self.criterion.sums_gradients and not self.criterion.needs_per_sample \
            and not sharded
        if sharded and self.criterion.needs_per_sample:
            raise PrunerError(
                f"criterion {criterion!r} needs per-sample gradients, but a sharded (FSDP2) model only "
                "exposes gradients averaged over ranks: use element1, vector, l1, l2, random or activation, "
                "or the DDP strategy"
            )
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.dims: dict[str, set[int]] = {}
        for fam in families:
            for m in fam.members:
                self.dims.setdefault(m.param, set()).add(m.dim)
        missing = [p for p in self.dims if p not in self.params]
        if missing:
            raise PrunerError(f"groups refer to parameters the model does not have: {missing[:3]}")
        # tied weights appear under several names: accumulate once per tensor
        self._canonical: dict[int, str] = {}
        for name in self.dims:
            self._canonical.setdefault(id(self.params[name]), name)
        # every dim any of a tensor's names is scored along, keyed by its canonical name (hook hot path)
        self._tensor_dims: dict[str, set[int]] = {}
        for name, dims in self.dims.items():
            self._tensor_dims.setdefault(self._canonical[id(self.params[name])], set()).update(dims)
        self.num_samples = 0
        self._weight = 1.0
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._fisher: dict[tuple[str, int], torch.Tensor] = {}
        self._act_sq: dict[str, torch.Tensor] = {}  # input-channel sum of squares per linear
        self._act_tokens: dict[str, int] = {}
        self._handles: list = []
        self._requires_grad: dict[str, bool] = {}
        self._direct: dict[str, nn.Linear] = {}  # canonical name -> the one Linear that uses it
        self._names: dict[str, list[str]] = {}  # canonical name -> every name of that tensor
        for name in self.dims:
            self._names.setdefault(self._canonical[id(self.params[name])], []).append(name)
        self._reduced: dict[tuple[str, int], torch.Tensor] = {}  # one_pass: vectors already computed
        self._reduced_tensors: set[str] = set()

    def _direct_linears(self) -> dict[str, nn.Linear]:
        """The scored weights whose gradient sum can be formed by hooks on their Linear: plain
        ``nn.Linear`` weights, not tied to anything else, scored by a first-order sum only."""
        if not self.direct_linear or not self.criterion.sums_gradients or self.criterion.needs_per_sample:
            return {}
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            return {}  # recomputed forwards would register the output hooks twice
        users: dict[int, list[nn.Module]] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                users.setdefault(id(p), []).append(module)
        out = {}
        for name in self._canonical.values():
            p = self.params[name]
            mods = users.get(id(p), [])
            if len(mods) == 1 and isinstance(mods[0], nn.Linear) and mods[0].weight is p:
                out[name] = mods[0]
        return out

    def _non_finite(self, name: str, stats) -> PrunerError:
        """Why ``name``'s saliences are NaN/inf: its weights, its gradients or its inputs."""
        if not bool(torch.isfinite(stats.weight).all()):
            return PrunerError(f"{name} holds NaN/inf weights: the model itself is broken (a damaged checkpoint, or "
                               "weights that overflowed in a float16 conversion); load it again in float32 or bfloat16")
        if self.criterion.needs_gradients:
            return PrunerError(f"non-finite gradient (NaN/inf) in {name} during calibration: lower the precision risk "
                               "(use float32 or bfloat16, not float16) or check the calibration data")
        return PrunerError(f"non-finite inputs (NaN/inf) reached {name} during calibration: check the calibration "
                           "data and the model's dtype (float32 or bfloat16, not float16)")

    # -- driving -------------------------------------------------------------------------------
    def attach(self) -> None:
        c = self.criterion
        if c.needs_gradients and not self.sharded:
            self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
            self._direct = self._direct_linears()
            wanted = {id(self.params[n]) for n in self.dims if self._canonical[id(self.params[n])] not in self._direct}
            for p in self.model.parameters():
                p.requires_grad_(id(p) in wanted)
            for tensor_id, name in self._canonical.items():
                if name in self._direct:
                    module = self._direct[name]
                    self._handles.append(module.register_forward_pre_hook(_input_requiring_grad))
                    self._handles.append(module.register_forward_hook(self._linear_hook(name)))
                else:
                    self._handles.append(self.params[name].register_post_accumulate_grad_hook(self._grad_hook(name)))
            if c.sums_gradients and not self.one_pass:
                # the running sums are allocated here, in one go, not between the transient
                # gradients of the first backward (less heap fragmentation on CPU: SmolLM2's
                # peak RSS went from 744 to 715 MB; most of the rest is glibc keeping freed
                # temporaries, see benchmarks/prune_cost.py)
                for name in self._canonical.values():
                    p = self.params[name]
                    if name not in self._grad_sum:  # kept when resuming from load_state()
                        self._grad_sum[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if c.needs_activations:
            linear_of = {f"{n}.weight": (n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
            for name in self.dims:
                if name in linear_of:  # row and column scores both weigh |w| by input-channel norms
                    self._handles.append(linear_of[name][1].register_forward_pre_hook(self._act_hook(name)))

    def begin_batch(self, num_samples: int, weight: float | None = None) -> None:
        """Call before each backward with the number of samples the loss averages over.
        ``weight``: what the loss's gradient counts for (default ``num_samples``; a micro-batch
        of a larger batch counts for its share of the batch's labelled tokens)."""
        if num_samples <= 0:
            raise PrunerError(f"a calibration batch must hold at least one sample, got {num_samples}")
        if self.criterion.needs_per_sample and num_samples != 1:
            raise PrunerError(
                f"criterion {self.criterion.name!r} needs per-sample gradients (second-order Fisher term): "
                f"use calibration batches of one sample, got {num_samples}"
            )
        if self.one_pass and self.num_samples:
            raise PrunerError("this estimator reduces its one backward's gradients as they come (one_pass): a "
                              "second calibration backward cannot be added; run the calibration as one batch, or "
                              "build the estimator with one_pass=False")
        self.num_samples += num_samples
        self._last_samples = num_samples
        self._weight = float(num_samples if weight is None else weight)

    def discard_batch(self) -> int:
        """Uncounts the batch :meth:`begin_batch` announced last, when no backward followed it
        (nothing was accumulated for it); returns its samples."""
        samples, self._last_samples = getattr(self, "_last_samples", 0), 0
        self.num_samples -= samples
        return samples

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for n, p in self.model.named_parameters():
            if n in self._requires_grad:
                p.requires_grad_(self._requires_grad[n])

    @torch.no_grad()
    def accumulate_gradients(self, world_size: int = 1) -> None:
        """Sharded mode: adds each parameter's current ``.grad`` shard to the running sums, then
        frees it. FSDP2 averages gradients over ``world_size`` ranks; the sum convention of the
        hooks (loss-mean gradient times samples, summed over ranks) needs them times
        ``world_size`` (every rank's batch holds the same number of samples)."""
        if not self.sharded:
            raise PrunerError("accumulate_gradients() is for sharded estimators; hooks accumulate otherwise")
        if not self.criterion.needs_gradients:
            return
        for name in self._canonical.values():
            param = self.params[name]
            if param.grad is None:
                continue
            g = local_tensor(param.grad).detach().float()
            if not torch.isfinite(g).all():
                raise PrunerError(f"non-finite gradient (NaN/inf) in {name} during calibration: check the data "
                                  "and use float32 or bfloat16")
            acc = self._grad_sum.get(name)
            alpha = self._weight * world_size
            self._grad_sum[name] = g * alpha if acc is None else acc.add_(g, alpha=alpha)
            param.grad = None

    # -- hooks ---------------------------------------------------------------------------------
    def _grad_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            # no isfinite() here (a model-sized temporary per tensor per sample): NaN/inf survive
            # summation, so vectors() checks the sums once
            g = grad.detach().float()
            if self.one_pass:  # reduced now, nothing kept
                self._reduce_now(name, torch.zeros_like(g).add_(g, alpha=self._weight))
            elif self.criterion.sums_gradients:
                self._grad_sum[name].add_(g, alpha=self._weight)
            if self.criterion.needs_per_sample:
                w2g2 = param.detach().float().square() * g.square()  # computed once for every dim
                for dim in self._tensor_dims[name]:
                    key = (name, dim)
                    v = reduce_except(w2g2, dim)
                    self._fisher[key] = v if key not in self._fisher else self._fisher[key].add_(v)
            param.grad = None  # the running sum above is all we keep

        return hook

    def _linear_hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if not (torch.is_grad_enabled() and output.requires_grad) or recomputing():
                return

            def on_output_grad(dy: torch.Tensor) -> None:
                w = module.weight
                acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if self.one_pass \
                    else self._grad_sum[name]  # (out, in) fp32
                dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, out)
                x2 = x.detach().reshape(-1, x.shape[-1])  # (tokens, in)
                if dy2.dtype != acc.dtype or x2.dtype != acc.dtype:
                    dy2, x2 = dy2.to(acc.dtype), x2.to(acc.dtype)
                acc.addmm_(dy2.T, x2, alpha=self._weight)  # acc += weight * dL/dW
                if self.one_pass:
                    self._reduce_now(name, acc)

            output.register_hook(on_output_grad)

        return hook

    def _act_hook(self, name: str):
        def hook(module, args):
            if recomputing():  # activation checkpointing: this forward was counted once already
                return
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            sq = x.square().sum(0)
            self._act_sq[name] = sq if name not in self._act_sq else self._act_sq[name].add_(sq)
            self._act_tokens[name] = self._act_tokens.get(name, 0) + x.shape[0]

        return hook

    # -- results -------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Every accumulator as a flat dict of tensors (summed across ranks for DDP)."""
        out = {f"grad::{k}": v for k, v in self._grad_sum.items()}
        out.update({f"fisher::{k}::{d}": v for (k, d), v in self._fisher.items()})
        out.update({f"act::{k}": v for k, v in self._act_sq.items()})
        out.update({f"acttok::{k}": torch.tensor(float(n)) for k, n in self._act_tokens.items()})
        out["num_samples"] = torch.tensor(float(self.num_samples))
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._grad_sum, self._fisher, self._act_sq, self._act_tokens = {}, {}, {}, {}
        for key, v in state.items():
            kind, _, rest = key.partition("::")
            if kind == "grad":
                self._grad_sum[rest] = v
            elif kind == "fisher":
                name, _, dim = rest.rpartition("::")
                self._fisher[(name, int(dim))] = v
            elif kind == "act":
                self._act_sq[rest] = v
            elif kind == "acttok":
                self._act_tokens[rest] = int(v.item())
        self.num_samples = int(state["num_samples"].item())

    @torch.no_grad()
    def vectors(self, consume: bool = False) -> dict[tuple[str, int], torch.Tensor]:
        """Per-index salience vectors ``{(param, dim): (size of dim,)}`` in fp32. ``consume``
        frees each running sum as soon as its vectors are computed (the estimator is spent:
        its state is gone), so memory falls during scoring instead of peaking there."""
        if self.criterion.needs_gradients and self.num_samples == 0:
            raise PrunerError("no calibration samples were seen: pass at least one batch before scoring")
        out = dict(self._reduced)
        for canon in self._names:
            if canon in self._reduced_tensors:
                continue
            out.update(self._tensor_vectors(canon, self._grad_sum.get(canon)))
            if consume:
                self._grad_sum.pop(canon, None)
        return out

    @torch.no_grad()
    def _reduce_now(self, canon: str, grad_sum: torch.Tensor) -> None:
        """one_pass: the tensor's vectors from its only gradient, at once; the gradient is dropped."""
        self._reduced.update(self._tensor_vectors(canon, grad_sum))
        self._reduced_tensors.add(canon)

    def _tensor_vectors(self, canon: str, grad_sum: torch.Tensor | None) -> dict[tuple[str, int], torch.Tensor]:
        """The vectors of every name of one tensor, from what calibration accumulated for it."""
        criterion = self.criterion
        n = max(self.num_samples, 1)
        out = {}
        for name in self._names[canon]:
            param, dims = self.params[name], self.dims[name]
            stats = ParameterStatistics(
                weight=local_tensor(param.detach()).float(),  # sharded: this rank's rows only
                samples=n, grad_sum=grad_sum,
                fisher_sums={d: self._fisher[(canon, d)] for d in dims if (canon, d) in self._fisher},
                input_sq_sum=self._act_sq.get(canon), input_tokens=self._act_tokens.get(canon, 0))
            if criterion.sums_gradients and stats.grad_sum is None:
                raise PrunerError(f"{name} received no gradient during calibration; is it used by the model?")
            element = criterion.element_salience(stats)  # once per parameter, shared by its dims
            for dim in dims:
                v = criterion.index_salience(stats, element, dim)
                offset = shard_offset(param, dim) if self.sharded else None
                if offset is not None:  # this rank's rows of the full vector; zeros elsewhere
                    full = torch.zeros(param.shape[dim], dtype=v.dtype, device=v.device)
                    full[offset: offset + v.shape[0]] = v
                    v = full
                if self.sharded and (replicas := replica_count(param)) > 1:
                    v = v / replicas  # HSDP: as many ranks hold this shard; the sum over ranks counts it once
                # NaN/inf in a running sum survive into every vector computed from it, so the
                # small vectors are checked instead of the model-sized sums
                if not bool(torch.isfinite(v).all()):
                    raise self._non_finite(name, stats)
                # sums start at zero (attach), so "never reached" shows as an all-zero vector; a weight
                # that is zero itself scores zero whatever its gradient, which is a true score
                if criterion.sums_gradients and not self.sharded and not bool(v.any()) and bool(stats.weight.any()):
                    raise PrunerError(f"{name} received no gradient during calibration; is it used by the model?")
                out[(name, dim)] = v
            del element, stats
        return out
