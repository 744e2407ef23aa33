"""``CausalLMModule``: any Hugging Face causal LM as a LightningModule, with optional LoRA.

A convenience, not a contract: ``StructuralPruneCallback`` treats it like any user module (it
finds the causal LM at ``module.lm``). What it adds: loading by hub name, folder, GGUF file or
``"smollm2"`` (never running code from the folder), a tokenizer for the data module, plain LoRA
fine-tuning (``attach_lora_at_start``), AdamW, validation perplexity, distillation from a
teacher during recovery (the optional ``wants_teacher`` / ``keep_teacher`` hooks the callback
calls), and FSDP2 sharding (``shard_model``). Batches are dicts with ``input_ids``,
``attention_mask`` and ``labels`` (-100 = no loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from torchmetrics.text import Perplexity

from pruner.distributed import is_fsdp_module
from pruner.errors import PrunerError
from pruner.lightning_modules.data import TEACHER_STATES  # the recovery batches' key the data module fills
from pruner.recovery import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS  # a tuple: jsonargparse prints it as a list
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
        lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA settings of
            ``attach_lora_at_start`` (with the pruning callback, LoRA is the callback's: set them
            there).
        learning_rate, weight_decay: AdamW settings over the trainable parameters.
        lr_schedule: ``"constant"`` keeps ``learning_rate``; ``"linear"`` decays it linearly to 0
            over the steps left in the fit when the optimizer is built (with the pruning callback
            that is at the prune step, so over the recovery steps), after ``warmup_steps`` of
            linear warm-up. Needs a known number of steps (``trainer.max_steps`` or a sized loader).
        warmup_steps: first steps at a rate rising linearly to ``learning_rate`` (either schedule;
            step i of w runs at (i + 1) / (w + 1) of it).
        distillation_alpha: weight of the distillation term in recovery,
            ``alpha · KL(teacher ‖ student) · T² + (1 − alpha) · CE`` (``pruner.recovery.distillation``);
            0 = plain next-token loss. The teacher is the dense model, which the pruning callback
            keeps (frozen) just before it removes groups; that costs one more copy of the dense
            weights (in ``teacher_dtype``) and one logits tensor per step.
        distillation_temperature: T (softens both distributions; the loss is scaled by T²).
        distillation_top_k: KL on the teacher's k largest logits only (None = full vocabulary).
        teacher: model to distil from when there is no pruning step in this fit (for example
            fine-tuning an exported pruned folder); None = the dense model the callback keeps.
        teacher_dtype: ``"bfloat16"`` halves the teacher's memory; ``"auto"`` = ``dtype``.
        teacher_states: on text the dense model writes itself (``PruneDataModule(recovery_source=
            "generated")``), take the teacher's logits from what its output layer received while
            it wrote the text (cached beside it) instead of a teacher forward pass at every step:
            the callback then keeps only the dense output layer, not a copy of the whole model.
            The same loss to rounding, without a teacher forward per step. Models
            whose logits are not that layer's output (e.g. soft-capped) fall back to the forward.
        trust_remote_code: let transformers run modelling code shipped in the model folder
            (only for folders you trust; pruner exports never need it).
        activation_checkpointing: recompute each decoder layer in the backward instead of keeping
            its activations (transformers' non-reentrant gradient checkpointing), in calibration
            and recovery alike: activation memory of one layer instead of all, for one more
            forward pass per step. The importance and the plan are those without it.

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
        lr_schedule: Literal["constant", "linear"] = "constant",
        warmup_steps: int = 0,
        distillation_alpha: float = 0.0,
        distillation_temperature: float = 2.0,
        distillation_top_k: int | None = None,
        teacher: str | None = None,
        teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto",
        teacher_states: bool = True,
        trust_remote_code: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dtype not in ("auto", "float32", "bfloat16"):
            raise PrunerError(
                f"`CausalLMModule(dtype={dtype!r})` is not supported: use 'auto', 'float32' or 'bfloat16'"
            )
        from pruner.recovery import LoraSettings

        try:
            LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                         target_modules=tuple(lora_target_modules) if isinstance(lora_target_modules, (list, tuple))
                         else lora_target_modules)
        except PrunerError as e:
            raise PrunerError(f"`CausalLMModule`: {e}") from None
        if not isinstance(learning_rate, (int, float)) or isinstance(learning_rate, bool) \
                or not math.isfinite(learning_rate) or learning_rate <= 0:
            raise PrunerError(
                f"`CausalLMModule(learning_rate={learning_rate!r})` must be a positive number (the paper uses 1e-4)"
            )
        if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) \
                or not math.isfinite(weight_decay) or weight_decay < 0:
            raise PrunerError(f"`CausalLMModule(weight_decay={weight_decay!r})` must be a number >= 0")
        from pruner.checks import check_int

        if lr_schedule not in ("constant", "linear"):
            raise PrunerError(f"`CausalLMModule(lr_schedule={lr_schedule!r})`: use 'constant' or 'linear'")
        check_int("`CausalLMModule(warmup_steps)`", warmup_steps, 0, fix="0 = no warm-up")
        for name, value in (("attach_lora_at_start", attach_lora_at_start), ("trust_remote_code", trust_remote_code),
                            ("teacher_states", teacher_states),
                            ("activation_checkpointing", activation_checkpointing)):
            if not isinstance(value, bool):
                raise PrunerError(f"`CausalLMModule({name}={value!r})` must be true or false")
        defaults = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_modules": DEFAULT_LORA_TARGETS}
        given = {"lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                 "lora_target_modules": tuple(lora_target_modules)}
        changed = [k for k in defaults if given[k] != defaults[k]]
        if changed and not attach_lora_at_start:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"CausalLMModule: {changed} only apply with attach_lora_at_start=True (a plain LoRA "
                           "fine-tune); with StructuralPruneCallback, LoRA is the callback's: set its lora_* options")
        from pruner.recovery.distillation import check_distillation_args

        try:
            check_distillation_args(distillation_alpha, distillation_temperature, distillation_top_k)
        except ValueError as e:
            raise PrunerError(f"`CausalLMModule`: {e}") from None
        if teacher is not None:
            from pruner.io import resolve_model_source

            resolve_model_source(teacher)  # FileNotFoundError now, not when the weights load
        if teacher is not None and distillation_alpha == 0.0:
            raise PrunerError(f"`CausalLMModule(teacher={teacher!r})` is unused with distillation_alpha=0: "
                              "set distillation_alpha > 0 (e.g. 0.5) or drop teacher")
        if teacher_dtype not in ("auto", "float32", "bfloat16"):
            raise PrunerError(f"`CausalLMModule(teacher_dtype={teacher_dtype!r})`: use 'auto', 'float32' or 'bfloat16'")
        self.save_hyperparameters()
        from pruner.io import load_tokenizer  # raises FileNotFoundError for a bad path, early

        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.lm: torch.nn.Module | None = None  # the HF model (LoRA layers, when attached, sit inside it)
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
    def _set_teacher(self, model: torch.nn.Module, output_layer_only: bool = False) -> None:
        model.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", model)
        object.__setattr__(self, "_teacher_is_output_layer", output_layer_only)

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The frozen model distilled from (its output layer alone with teacher states), or None."""
        return self.__dict__.get("_teacher")

    @property
    def wants_teacher(self) -> bool:
        """Whether recovery distils (the pruning callback then keeps the dense model)."""
        return self.hparams.get("distillation_alpha", 0.0) > 0.0

    @property
    def wants_teacher_states(self) -> bool:
        """Whether recovery batches of generated text should carry the dense model's states
        (``PruneDataModule`` reads this): distillation from the dense model itself, not sharded
        by FSDP2 (whose output layer holds only a shard of its weight outside the forward pass)."""
        hp = self.hparams
        return (self.wants_teacher and hp.get("teacher") is None and hp.get("teacher_states", False)
                and self.device_mesh is None)

    def _data_has_teacher_states(self) -> bool:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return getattr(datamodule, "teacher_states", None) is not None

    @property
    def teacher_dtype(self) -> torch.dtype:
        """The dtype the distillation teacher is kept in (``teacher_dtype``, resolved)."""
        return self._teacher_dtype()

    def keep_teacher(self, model: torch.nn.Module, copy: bool = True) -> None:
        """Keeps a frozen copy of ``model`` (the dense model, just before pruning) as teacher;
        only of its output layer when the recovery batches carry its states. ``copy=False``: the
        caller hands over a model it no longer uses, kept as it is (under FSDP2 the dense model's
        own shards: no rank gathers a copy); its dtype must be ``teacher_dtype`` already.

        Example:
            >>> module.keep_teacher(module.hf_model)  # doctest: +SKIP
            >>> module.teacher is not module.hf_model  # doctest: +SKIP
            True
        """
        import copy as copies

        only_head = self.wants_teacher_states and self._data_has_teacher_states()
        if only_head:
            model = model.get_output_embeddings()  # a copy of the tied weight, not the embedding itself
        if copy:
            model = copies.deepcopy(model).to(self._teacher_dtype())
        elif (dtype := next(model.parameters()).dtype) != self._teacher_dtype():
            raise PrunerError(f"keep_teacher(copy=False): the model is {dtype}, the teacher is kept in "
                              f"{self._teacher_dtype()} (teacher_dtype); converting it would make a copy: pass copy=True "
                              "or set teacher_dtype: auto")
        self._set_teacher(model, output_layer_only=only_head)

    def configure_model(self) -> None:
        """Loads the weights once (Lightning calls this hook for every fit/validate/test)."""
        if self.lm is not None:
            return
        from pruner.io import load_model

        hp = self.hparams
        model, _ = load_model(hp.model, dtype=self._resolve_dtype(), trust_remote_code=hp.trust_remote_code)
        model.train()  # load_model returns eval mode; Lightning toggles modes from here on
        if hp.get("activation_checkpointing", False):
            # non-reentrant: gradients reach LoRA and the importance hooks whatever requires grad
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.lm = model
        if hp.teacher is not None:
            teacher, _ = load_model(hp.teacher, dtype=self._teacher_dtype(), trust_remote_code=hp.trust_remote_code)
            self._set_teacher(teacher)
        if hp.attach_lora_at_start:
            self.attach_lora()  # before sharding, so that the adapters are sharded too
        if self.device_mesh is not None:  # set by ModelParallelStrategy only
            self.shard_model()

    def shard_model(self) -> None:
        """FSDP2 (``fully_shard``) over the ``data_parallel`` dimension of ``self.device_mesh``:
        each decoder layer, then the whole model (embeddings, norm, head). Called by
        ``configure_model`` under ``ModelParallelStrategy`` (which requires the hook to do the
        parallelization), and by the pruning callback for the pruned model; override it for
        tensor parallelism."""
        from pruner.callbacks.distributed import data_parallel_mesh, shard_causal_lm
        from pruner.structure import find_layer_stack

        model = self.hf_model
        shard_causal_lm(model, find_layer_stack(model)[0], data_parallel_mesh(self))

    @property
    def hf_model(self):
        """The ``transformers`` model itself (LoRA layers, when attached, sit inside it). Loads
        the weights on first access."""
        if self.lm is None:
            self.configure_model()
        return self.lm

    @property
    def has_lora(self) -> bool:
        """Whether LoRA adapters are attached."""
        from pruner.recovery import has_lora

        return self.lm is not None and has_lora(self.lm)

    def lora_settings(self):
        """The ``pruner.recovery.lora.LoraSettings`` of this module's LoRA hyper-parameters."""
        from pruner.recovery import LoraSettings

        hp = self.hparams
        return LoraSettings(r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout,
                            target_modules=tuple(hp.lora_target_modules))

    def attach_lora(self) -> None:
        """Freezes the model and adds LoRA adapters (in place) to ``lora_target_modules``. The
        optimizer must be rebuilt afterwards when training is under way.

        Example:
            >>> module.attach_lora()  # doctest: +SKIP
            >>> module.has_lora  # doctest: +SKIP
            True
        """
        from pruner.recovery import attach_lora

        attach_lora(self.hf_model, self.lora_settings())

    def merge_lora(self) -> None:
        """Folds the LoRA deltas into the base weights, in place; all parameters stay frozen
        (call ``requires_grad_(True)`` to fine-tune further).

        Example:
            >>> module.merge_lora()  # doctest: +SKIP
            >>> module.has_lora  # doctest: +SKIP
            False
        """
        from pruner.recovery import merge_lora

        merge_lora(self.hf_model)

    # ------------------------------------------------------------------ steps

    def forward(self, **batch: torch.Tensor):
        # Only model inputs: data modules may add bookkeeping keys to a batch.
        return self.lm(**{k: v for k, v in batch.items() if k in _MODEL_KEYS})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        n = batch["input_ids"].shape[0]
        out = self(**batch)
        if self.teacher is None or not self.wants_teacher:
            # (during the pruning callback's calibration there is no teacher yet: plain next-token loss)
            self.log("train_loss", out.loss, prog_bar=True, batch_size=n)
            return out.loss
        from pruner.recovery import distillation_loss

        teacher = self.teacher
        if next(teacher.parameters()).device != out.logits.device:
            teacher.to(out.logits.device)  # unregistered: the strategy does not move it
        with torch.no_grad():
            t_logits = self._teacher_logits(teacher, batch, self.__dict__.get("_teacher_is_output_layer", False))
        if is_fsdp_module(teacher):
            # an FSDP2 teacher (the dense model's shards): its root weights (embeddings, head) stay
            # gathered after a forward pass, for a backward that a teacher never runs
            teacher.reshard()
        hp = self.hparams
        parts = distillation_loss(out.logits, t_logits, batch["labels"], hp.distillation_alpha,
                                  hp.distillation_temperature, hp.distillation_top_k)
        self.log("train_loss", parts.loss, prog_bar=True, batch_size=n)
        self.log("train_kl", parts.kl, batch_size=n)
        self.log("train_ce", parts.ce, batch_size=n)
        return parts.loss

    @staticmethod
    def _teacher_logits(teacher: torch.nn.Module, batch: dict[str, torch.Tensor],
                        output_layer_only: bool) -> torch.Tensor:
        """(B, T, V) from the teacher's forward pass, or (B, T-1, V) from its output layer
        applied to the batch's ``teacher_states`` (B, T-1, H)."""
        states = batch.get(TEACHER_STATES)
        if states is None:
            if output_layer_only:
                raise PrunerError("the teacher kept is the dense output layer alone, but this batch carries no "
                                  "teacher_states: distil on PruneDataModule's generated text, or set "
                                  "CausalLMModule(teacher_states=False)")
            return teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        head = teacher if output_layer_only else teacher.get_output_embeddings()
        return head(states.to(next(head.parameters()).dtype))

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

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise PrunerError(
                "no trainable parameters: attach LoRA, or call requires_grad_(True) after merge_lora()"
            )
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        schedule, warmup = hp.get("lr_schedule", "constant"), hp.get("warmup_steps", 0)
        if schedule == "constant" and warmup == 0:
            return optimizer
        steps = self._steps_left() if schedule == "linear" else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearSchedule(warmup, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_left(self) -> int:
        """Optimizer steps from now to the end of this fit (at the prune step: the recovery's)."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # max_steps (-1 = unset) when the loader has no length
        if not math.isfinite(total) or total < 1:
            raise PrunerError("`CausalLMModule(lr_schedule='linear')` needs to know how many steps the fit has: set "
                              "trainer.max_steps (or use a loader with a length), or lr_schedule='constant'")
        left = int(total) - trainer.global_step
        if left < 1:
            raise PrunerError(f"`CausalLMModule(lr_schedule='linear')`: no steps left to decay over (the fit has "
                              f"{int(total)} and {trainer.global_step} are done): raise trainer.max_steps")
        return left


class LinearSchedule:
    """LR factor per step: linear warm-up over ``warmup`` steps, then constant (``steps`` None)
    or linear decay to 0 at step ``steps``. A callable object, not a lambda, so that ``LambdaLR``
    saves it in checkpoints and a resumed fit decays to the same end.

    Example:
        >>> [round(LinearSchedule(2, 6)(s), 2) for s in range(7)]
        [0.33, 0.67, 1.0, 0.75, 0.5, 0.25, 0.0]
    """

    def __init__(self, warmup: int, steps: int | None) -> None:
        self.warmup, self.steps = warmup, steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.steps is None:
            return 1.0
        return max(0.0, (self.steps - step) / max(1, self.steps - self.warmup))

