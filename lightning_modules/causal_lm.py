"""``CausalLMModule``: any Hugging Face causal LM as a LightningModule, with optional LoRA.

Contract with ``pruner.callbacks.StructuralPruneCallback`` (keep it small):
  * ``module.hf_model`` is the ``transformers`` model (``PreTrainedModel``); the callback prunes
    it in place (or swaps it with ``module.replace_hf_model(m)``) and then rebuilds the optimizer
    with ``trainer.strategy.setup_optimizers(trainer)``: ``configure_optimizers`` collects the
    trainable parameters *at that moment*, so replaced/resized parameters are picked up.
  * ``module.attach_lora()`` after pruning, ``module.merge_lora()`` before saving.
  * ``module.pruning_plan = plan.to_dict()`` after pruning: checkpoints then record the plan,
    and loading one re-applies it to the freshly loaded dense model (and re-attaches LoRA)
    *before* the weights are restored, so that ``--ckpt_path`` resumes a pruned run.
  * ``module.calibrating = True`` makes every training batch a forward + backward with NO
    optimizer step: gradients stay in ``p.grad`` for the callback's ``on_after_backward`` /
    ``on_train_batch_end``; the next batch zeroes them. Lightning still counts these batches
    in ``global_step`` (so ``trainer.max_steps`` = calibration batches + recovery steps).
  * Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (-100 = no loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torchmetrics.text import Perplexity

from pruner.errors import PrunerError

# A tuple: an immutable default that jsonargparse still prints and parses as a YAML list.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODEL_KEYS = ("input_ids", "attention_mask", "labels")


class CausalLMModule(LightningModule):
    """A causal LM trained with its own next-token loss; validation logs ``val_ppl``.

    Args:
        model: hub name, local folder (also a pruned export), ``.gguf`` file, or ``"smollm2"``.
            The tokenizer loads at construction (the data module needs it in ``setup``, which
            Lightning runs before ``configure_model``); the weights load in ``configure_model``,
            inside the strategy's init context, which is where FSDP/ModelParallel expect it.
        dtype: weight dtype. ``"auto"``: bfloat16 on a CUDA device that supports it, else
            float32 (CPU). fp16 is deliberately not offered: it overflows in LLaMA training.
        attach_lora_at_start: wrap the model with LoRA as soon as it is loaded (a plain LoRA
            fine-tune). Leave False with the pruning callback: it calls ``attach_lora()`` after
            pruning. False without the callback means full fine-tuning.
        lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA settings (LLM-Pruner's).
        learning_rate, weight_decay: AdamW settings over the trainable parameters.
        distillation_alpha: weight of the distillation term in recovery,
            ``alpha · KL(teacher ‖ student) · T² + (1 − alpha) · CE`` (``pruner.distillation``);
            0 = plain next-token loss. The teacher is the dense model, which the pruning callback
            keeps (frozen) just before it removes groups; that costs one more copy of the dense
            weights (in ``teacher_dtype``) and one logits tensor per step.
        distillation_temperature: T (softens both distributions; the loss is scaled by T²).
        distillation_top_k: KL on the teacher's k largest logits only (None = full vocabulary).
        teacher: model to distil from when there is no pruning step in this fit (for example
            fine-tuning an exported pruned folder); None = the dense model the callback keeps.
        teacher_dtype: ``"bfloat16"`` halves the teacher's memory; ``"auto"`` = ``dtype``.

    Example:
        >>> module = CausalLMModule("smollm2", attach_lora_at_start=True)  # doctest: +SKIP
        >>> module.configure_model()  # doctest: +SKIP
        >>> sum(p.numel() for p in module.parameters() if p.requires_grad)  # doctest: +SKIP
        2442240
    """

    def __init__(
        self,
        model: str = "smollm2",
        dtype: Literal["auto", "float32", "bfloat16"] = "auto",
        attach_lora_at_start: bool = False,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        distillation_alpha: float = 0.0,
        distillation_temperature: float = 2.0,
        distillation_top_k: int | None = None,
        teacher: str | None = None,
        teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    ) -> None:
        super().__init__()
        if dtype not in ("auto", "float32", "bfloat16"):
            raise PrunerError(
                f"`CausalLMModule(dtype={dtype!r})` is not supported: use 'auto', 'float32' or 'bfloat16'"
            )
        if lora_r < 1:
            raise PrunerError(f"`CausalLMModule(lora_r={lora_r})` must be >= 1 (the paper uses 8)")
        if not 0.0 <= lora_dropout < 1.0:
            raise PrunerError(f"`CausalLMModule(lora_dropout={lora_dropout})` must be in [0, 1)")
        if learning_rate <= 0:
            raise PrunerError(
                f"`CausalLMModule(learning_rate={learning_rate})` must be > 0 (the paper uses 1e-4)"
            )
        if isinstance(lora_target_modules, str) or not lora_target_modules:
            raise PrunerError(
                f"`CausalLMModule(lora_target_modules={lora_target_modules!r})` must be a non-empty "
                "list of linear-layer names, e.g. [q_proj, v_proj]; leave it unset for all seven"
            )
        from pruner.distillation import check_distillation_args

        try:
            check_distillation_args(distillation_alpha, distillation_temperature, distillation_top_k)
        except ValueError as e:
            raise PrunerError(f"`CausalLMModule`: {e}") from None
        if teacher is not None and distillation_alpha == 0.0:
            raise PrunerError(f"`CausalLMModule(teacher={teacher!r})` is unused with distillation_alpha=0: "
                              "set distillation_alpha > 0 (e.g. 0.5) or drop teacher")
        if teacher_dtype not in ("auto", "float32", "bfloat16"):
            raise PrunerError(f"`CausalLMModule(teacher_dtype={teacher_dtype!r})`: use 'auto', 'float32' or 'bfloat16'")
        self.save_hyperparameters()
        from pruner.data import load_tokenizer  # raises FileNotFoundError for a bad path, early

        self.tokenizer = load_tokenizer(model)
        self.lm: torch.nn.Module | None = None  # HF model or its peft wrapper; see `hf_model`
        self.pruning_plan: dict | None = None  # set by the pruning callback (Plan.to_dict())
        self.calibrating = False  # True: backward without optimizer steps (importance batches)
        self.val_ppl = Perplexity(ignore_index=-100)
        self.test_ppl = Perplexity(ignore_index=-100)

    # ------------------------------------------------------------------ model and LoRA

    def _resolve_dtype(self) -> torch.dtype:
        name = self.hparams.dtype
        if name != "auto":
            return getattr(torch, name)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def _teacher_dtype(self) -> torch.dtype:
        name = self.hparams.get("teacher_dtype", "auto")
        return self._resolve_dtype() if name == "auto" else getattr(torch, name)

    # The teacher is deliberately NOT a registered submodule: it must not be wrapped by DDP or
    # sharded by FSDP, show up in parameters() (the optimizer), or be saved in checkpoints.
    def _set_teacher(self, model: torch.nn.Module) -> None:
        model.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", model)

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The frozen model distilled from, or None."""
        return self.__dict__.get("_teacher")

    @property
    def wants_teacher(self) -> bool:
        """Whether recovery distils (the pruning callback then keeps the dense model)."""
        return self.hparams.get("distillation_alpha", 0.0) > 0.0

    def keep_teacher(self, model: torch.nn.Module) -> None:
        """Keeps a frozen copy of ``model`` (the dense model, just before pruning) as teacher.

        Example:
            >>> module.keep_teacher(module.hf_model)  # doctest: +SKIP
            >>> module.teacher is not module.hf_model  # doctest: +SKIP
            True
        """
        import copy

        self._set_teacher(copy.deepcopy(model).to(self._teacher_dtype()))

    def configure_model(self) -> None:
        """Loads the weights once (Lightning calls this hook for every fit/validate/test)."""
        if self.lm is not None:
            return
        from pruner.models import load_model

        model, _ = load_model(self.hparams.model, dtype=self._resolve_dtype())
        model.train()  # load_model returns eval mode; Lightning toggles modes from here on
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.lm = model
        if self.hparams.teacher is not None:
            teacher, _ = load_model(self.hparams.teacher, dtype=self._teacher_dtype())
            self._set_teacher(teacher)
        if self.hparams.attach_lora_at_start:
            self.attach_lora()  # before sharding, so that the adapters are sharded too
        if self.device_mesh is not None:  # set by ModelParallelStrategy only
            self.shard_model()

    def shard_model(self) -> None:
        """FSDP2 (``fully_shard``) over the ``data_parallel`` dimension of ``self.device_mesh``:
        each decoder layer, then the whole model (embeddings, norm, head). Called by
        ``configure_model`` under ``ModelParallelStrategy`` (which requires the hook to do the
        parallelization); override it for tensor parallelism. After structural surgery the
        pruning callback rebuilds the sharding (see docs/design)."""
        from torch.distributed.fsdp import fully_shard

        mesh, names = self.device_mesh, self.device_mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            # Lightning's default splits devices into tensor-parallel ranks, which this module
            # does not implement: unsynchronised ranks would silently train different models.
            raise PrunerError(
                f"tensor parallelism (tensor_parallel_size={mesh['tensor_parallel'].size()}) is not "
                "supported: use ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)"
            )
        mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        layers = getattr(getattr(self.hf_model, "model", self.hf_model), "layers", None)
        for layer in layers if isinstance(layers, torch.nn.ModuleList) else []:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.lm, mesh=mesh)

    @property
    def hf_model(self):
        """The ``transformers`` model itself (not the peft wrapper; LoRA layers, when attached,
        sit inside it in place). Loads the weights on first access; see ``replace_hf_model``."""
        if self.lm is None:
            self.configure_model()
        return self.lm.get_base_model() if self.has_lora else self.lm

    def replace_hf_model(self, model: torch.nn.Module) -> None:
        """Swaps in another HF model (for example a rebuilt pruned one). A method, not a property
        setter: ``nn.Module.__setattr__`` would register a module under the property's name.

        Example:
            >>> module.replace_hf_model(pruned_model)  # doctest: +SKIP
        """
        if self.has_lora:
            raise PrunerError("cannot replace hf_model while LoRA is attached: call merge_lora() first")
        self.lm = model

    @property
    def has_lora(self) -> bool:
        """Whether the model is currently wrapped by peft."""
        from peft import PeftModel

        return isinstance(self.lm, PeftModel)

    def missing_lora_targets(self, removed_prefixes: Sequence[str] = ()) -> list[str]:
        """The ``lora_target_modules`` that match no module of the model (peft's rule: the full
        name or its last dotted parts), ignoring modules under ``removed_prefixes`` (layers a
        plan is about to delete). Empty when every target exists.

        Example:
            >>> module.missing_lora_targets()  # doctest: +SKIP
            []
        """
        names = [n for n, _ in self.hf_model.named_modules()
                 if not any(n == p or n.startswith(p + ".") for p in removed_prefixes)]
        return [t for t in self.hparams.lora_target_modules
                if not any(n == t or n.endswith("." + t) for n in names)]

    def attach_lora(self) -> None:
        """Freezes the model and adds LoRA adapters to ``lora_target_modules``. The optimizer must
        be rebuilt afterwards when training is under way (``trainer.strategy.setup_optimizers``).

        Example:
            >>> module.attach_lora()  # doctest: +SKIP
            >>> module.has_lora  # doctest: +SKIP
            True
        """
        from peft import get_peft_model

        if self.has_lora:
            raise PrunerError("LoRA is already attached: call merge_lora() before attaching again")
        # peft keeps adapter weights in fp32 when the base is bf16 (autocast_adapter_dtype).
        self.lm = get_peft_model(self.hf_model, self.lora_config())

    def lora_config(self):
        """The ``peft.LoraConfig`` of this module's LoRA settings.

        Example:
            >>> module.lora_config().r  # doctest: +SKIP
            8
        """
        from peft import LoraConfig

        hp = self.hparams
        return LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                          target_modules=list(hp.lora_target_modules), bias="none", task_type="CAUSAL_LM")

    def merge_lora(self) -> None:
        """Folds the LoRA deltas into the base weights and unwraps the peft model; all
        parameters stay frozen (call ``requires_grad_(True)`` to fine-tune further).

        Example:
            >>> module.merge_lora()  # doctest: +SKIP
            >>> module.has_lora  # doctest: +SKIP
            False
        """
        if not self.has_lora:
            raise PrunerError("no LoRA to merge: call attach_lora() first")
        self.lm = self.lm.merge_and_unload()

    # ------------------------------------------------------------------ steps

    def forward(self, **batch: torch.Tensor):
        # Only model inputs: data modules may add bookkeeping keys to a batch.
        return self.lm(**{k: v for k, v in batch.items() if k in _MODEL_KEYS})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        n = batch["input_ids"].shape[0]
        out = self(**batch)
        if self.calibrating or self.teacher is None or not self.wants_teacher:
            self.log("train_loss", out.loss, prog_bar=True, batch_size=n)
            return out.loss  # calibration importance always uses the plain next-token loss
        from pruner.distillation import distillation_loss

        teacher = self.teacher
        if next(teacher.parameters()).device != out.logits.device:
            teacher.to(out.logits.device)  # unregistered: the strategy does not move it
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        hp = self.hparams
        parts = distillation_loss(out.logits, t_logits, batch["labels"], hp.distillation_alpha,
                                  hp.distillation_temperature, hp.distillation_top_k)
        self.log("train_loss", parts.loss, prog_bar=True, batch_size=n)
        self.log("train_kl", parts.kl, batch_size=n)
        self.log("train_ce", parts.ce, batch_size=n)
        return parts.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(**batch)
        # Perplexity over next-token predictions: logits at t score the label at t+1.
        self.val_ppl.update(out.logits[:, :-1].float(), batch["labels"][:, 1:])
        n = batch["input_ids"].shape[0]
        self.log("val_loss", out.loss, sync_dist=True, batch_size=n)
        self.log("val_ppl", self.val_ppl, prog_bar=True, batch_size=n)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(**batch)
        self.test_ppl.update(out.logits[:, :-1].float(), batch["labels"][:, 1:])
        n = batch["input_ids"].shape[0]
        self.log("test_loss", out.loss, sync_dist=True, batch_size=n)
        self.log("test_ppl", self.test_ppl, batch_size=n)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if self.calibrating:
            # The closure zeroes the gradients, runs training_step and backward; skipping
            # optimizer.step() leaves the weights untouched (Lightning still counts a step).
            optimizer_closure()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise PrunerError(
                "no trainable parameters: attach LoRA, or call requires_grad_(True) after merge_lora()"
            )
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate,
                                 weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A pruned or LoRA-wrapped state dict does not load into the dense model: record how to
        # rebuild the structure it belongs to.
        checkpoint["pruner"] = {"plan": self.pruning_plan, "has_lora": self.has_lora}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this after configure_model (Trainer and load_from_checkpoint alike)
        # and before load_state_dict: rebuild the structure the saved weights belong to.
        info = checkpoint.get("pruner") or {}
        if info.get("plan") is not None and self.pruning_plan is None:
            if self.device_mesh is not None:  # the weights are already sharded: no surgery on shards
                raise PrunerError(
                    "resuming a pruned fit under ModelParallelStrategy (FSDP2) is not supported: resume it with "
                    "strategy: ddp (or one device), or fine-tune the exported pruned folder with FSDP2"
                )
            from pruner.plan import Plan
            from pruner.surgery import apply_plan

            if self.has_lora:  # fresh adapters from attach_lora_at_start: drop, prune, re-add
                self.lm = self.lm.unload()
            if self.wants_teacher and self.teacher is None:  # the callback kept it before pruning
                self.keep_teacher(self.hf_model)
            apply_plan(Plan.from_dict(info["plan"]), self.hf_model)
            self.pruning_plan = info["plan"]
        if info.get("has_lora") and not self.has_lora:
            self.attach_lora()
