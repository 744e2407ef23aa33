"""``PruneDataModule``: calibration, recovery (Alpaca) and validation data for pruning runs.

Train loader order (one pass = one Lightning epoch; keep ``trainer.max_epochs: 1`` and use
``recovery_epochs`` for passes over the recovery data, because a second Lightning epoch would
start with the calibration batches again):

  1. ``calibration_batches`` batches of ONE calibration window each (per rank). The pruning
     callback consumes exactly these for importance, without optimizer steps. Batch size 1
     matches LLM-Pruner, which back-propagates its calibration samples one by one (per-sample
     gradients matter for the second-order importance terms).
  2. then the recovery batches: ``recovery_epochs`` seeded shuffles of the tokenized Alpaca
     records in micro-batches of ``micro_batch_size`` (right-padded, prompt tokens masked).
     Plain text (``builtin``, a ``.txt`` file or folder) gives language-modelling windows of
     ``cutoff_len`` tokens; ``generated`` gives windows the dense model samples itself
     (data-free recovery, ``pruner.data.generated``; cached under ``generation_cache``), made when
     the train loader is first built, i.e. before calibration, while the model is still dense.
     Without ``recovery_source`` the loader yields the calibration batches only.

Reconstruction windows (``reconstruction_source``) are not train batches: the pruning callback
runs them itself, forward only, at the prune step (``reconstruction_batches()``), for its
least-squares refit (``StructuralPruneCallback(reconstruct=True)``). Text costs only forward
passes, so a few hundred windows are affordable where calibration has ten; ``generated``
windows are written by the dense model before calibration (no dataset needed).

Lightning counts the calibration batches in ``global_step`` too: ``trainer.max_steps`` =
``calibration_batches`` + recovery steps.

Every batch is a dict of ``input_ids``, ``attention_mask``, ``labels`` (-100 = no loss). With
``generated`` recovery text and a module whose ``wants_teacher_states`` is true (``CausalLMModule``
when it distils from the dense model), recovery batches also carry ``teacher_states``
``(B, T-1, hidden)``: what the dense model's output layer received at each position while it
wrote the text, cached beside it, so that the teacher's logits cost one matrix product instead
of a forward pass. Any other module never sees that key.

Resuming mid-pass (``--ckpt_path``): the train loader is stateful for Lightning (it has
``state_dict``/``load_state_dict``), so a checkpoint records how many batches of the pass the
training loop has taken and the resumed run continues with the next one instead of starting
over with the calibration windows.

Multi-GPU: the loader is an ``IterableDataset`` that shards by rank itself (Lightning does not
inject a ``DistributedSampler`` into it), so that every rank sees its calibration batches first
and all ranks get the same number of batches (no DDP hang): ``calibration_batches`` is the
per-rank count, ``calibration_samples // world_size``.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from pruner import data as D
from pruner.errors import PrunerError

DEFAULT_TEXT_RECOVERY_WINDOWS = 1000  # plain-text recovery without recovery_max_records
GENERATED = "generated"  # recovery_source: text the dense model writes itself (pruner.data.generated)
DEFAULT_GENERATED_SAMPLES = 256
# seed offsets from ``seed``: recovery text +1, generated recovery +2, reconstruction +3
RECOVERY_SEED, GENERATED_RECOVERY_SEED, RECONSTRUCTION_SEED = 1, 2, 3
STREAM_INDEX = "stream_index"  # bookkeeping key of train batches, removed before the model sees them
# Recovery batches' key for the dense model's output-layer inputs saved while it wrote the text
# (modules with ``wants_teacher_states`` only): the teacher's logits without its forward pass.
TEACHER_STATES = "teacher_states"


def _is_plain_text(source: str) -> bool:
    """``builtin``, a ``.txt`` file or a folder: recovery by plain language modelling."""
    from pathlib import Path

    return source == D.BUILTIN or source.endswith(".txt") or Path(source).is_dir()


def pad_collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads tokenized examples into a batch; padding is masked from attention and loss.

    Example:
        >>> b = pad_collate([{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6]},
        ...                  {"input_ids": [7], "attention_mask": [1], "labels": [7]}], pad_id=0)
        >>> b["labels"].tolist()
        [[-100, 6], [7, -100]]
    """
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        out["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        out["attention_mask"].append(e["attention_mask"] + [0] * pad)
        out["labels"].append(e["labels"] + [D.IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def window_batch(windows: torch.Tensor, unscored: int = 0) -> dict[str, torch.Tensor]:
    """A language-modelling batch of full windows: every token is attended and learned, but the
    first ``unscored`` predicted ones (labels -100: a validation window after BOS scores the
    tokens the paper protocol's window scores)."""
    labels = windows.clone()
    labels[..., 1 : 1 + unscored] = D.IGNORE_INDEX  # ([B,] T): label t is predicted at position t-1
    return {"input_ids": windows, "attention_mask": torch.ones_like(windows), "labels": labels}


class _TrainStream(IterableDataset):
    """Calibration batches, then recovery micro-batches (already sharded for this rank)."""

    def __init__(self, calibration: torch.Tensor, recovery: list[dict], micro_batch_size: int,
                 epochs: int, seed: int, pad_id: int, rank: int, world: int,
                 teacher_states: torch.Tensor | None = None) -> None:
        self.calibration, self.recovery, self.teacher_states = calibration, recovery, teacher_states
        self.mbs, self.epochs, self.seed, self.pad_id = micro_batch_size, epochs, seed, pad_id
        self.rank, self.world = rank, world
        self.batches_per_epoch = (len(recovery) // micro_batch_size) // world if recovery else 0
        self.start = 0  # batches to skip in the next pass (set when resuming from a checkpoint)

    def __len__(self) -> int:
        return len(self.calibration) + self.epochs * self.batches_per_epoch

    def __iter__(self):
        skip, self.start = self.start, 0  # only the resumed pass skips
        index = 0
        for window in self.calibration:
            if index >= skip:
                yield {**window_batch(window.unsqueeze(0)), STREAM_INDEX: index}
            index += 1
        for epoch in range(self.epochs if self.recovery else 0):
            gen = torch.Generator().manual_seed(self.seed + epoch)  # same order on every rank
            order = torch.randperm(len(self.recovery), generator=gen).tolist()
            for b in range(self.batches_per_epoch):
                if index >= skip:
                    start = (b * self.world + self.rank) * self.mbs
                    chosen = order[start : start + self.mbs]
                    batch = pad_collate([self.recovery[i] for i in chosen], self.pad_id)
                    if self.teacher_states is not None:  # (mbs, T-1, H): the teacher's logits, before its head
                        batch[TEACHER_STATES] = self.teacher_states[chosen]
                    yield {**batch, STREAM_INDEX: index}
                index += 1


class _ResumableLoader(DataLoader):
    """The train loader. Lightning treats a loader with ``state_dict``/``load_state_dict`` as
    stateful: it stores the state in checkpoints and loads it before iterating on resume.
    ``consumed`` counts batches the training loop has *taken* (set by the data module's
    ``on_before_batch_transfer``), not batches fetched: Lightning prefetches one ahead."""

    def __init__(self, stream: _TrainStream) -> None:
        # batch_size=None: the stream yields whole batches; no workers: data is in memory and
        # an IterableDataset would be duplicated in each worker.
        super().__init__(stream, batch_size=None)
        self.consumed = 0

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
        self.dataset.start = self.consumed


class PruneDataModule(LightningDataModule):
    """Calibration + recovery + validation data (see the module docstring for the order).

    Args:
        calibration_source: ``"builtin"`` (Python's own prose; no network), a text file or
            folder of ``.txt`` files, or a hub dataset such as ``"bookcorpus"``.
        calibration_samples, calibration_seq_len: number and length of the random windows
            (the paper: 10 x 64).
        seed: seeds the calibration windows and the recovery shuffles.
        recovery_source: Alpaca-format JSON file or hub name (``"yahma/alpaca-cleaned"``);
            or plain text (``"builtin"``, a ``.txt`` file or a folder of them): random windows
            of ``cutoff_len`` tokens, every token learned; or ``"generated"``: windows the dense
            model samples itself (data-free recovery); None = no recovery data.
        recovery_max_records: use only the first N records (quick CPU runs); plain text: the
            number of windows (default 1000); generated: the number of samples (default 256).
        recovery_epochs: passes over the recovery data inside the single train pass (paper: 2).
        micro_batch_size: recovery and validation batch size (the paper: 4).
        cutoff_len: longest tokenized instruction example; longer ones are truncated.
        val_source: WikiText-2 ``wiki.test.raw`` file, ``"wikitext-2-raw-v1"`` (hub) or
            ``"builtin-heldout"`` (stdlib prose that calibration and recovery never see;
            offline); None = no validation (and no test) loader.
        val_seq_len: perplexity window (the paper: 128). val_max_windows: first N windows only.
        tokenizer: model name/folder to take the tokenizer from; None = the LightningModule's
            ``tokenizer`` (the usual case with ``CausalLMModule``).
        reconstruction_source: text for the pruning callback's least-squares refit
            (``reconstruct: true``), run forward only at the prune step: ``"generated"``
            (windows the dense model writes itself; no dataset) or any calibration source
            (``"builtin"``, a text file or folder, a hub dataset); None = the refit uses the
            calibration windows (too few for a good refit: see the README).
        reconstruction_samples, reconstruction_seq_len: number and length of those windows
            (all ranks together; each rank runs ``reconstruction_samples // world_size``).
        generation_cache: folder for ``generated`` text (one sub-folder per model and
            settings; resumable; must be shared by all ranks).
        generation_batch_size: sequences generated together (one cached chunk); part of the
            cache key, since sampling in a batch draws random numbers in batch order.
        generation_temperature, generation_top_p: how the dense model samples that text
            (``pruner.data.generated.NucleusSampler``): temperature > 0 and nucleus mass in (0, 1];
            top_p 1 (the default) draws from the model's whole distribution. Part of the cache key.
        window_protocol: what the calibration, refit, plain-text recovery and validation windows
            start with (``pruner.data.windows``): ``"auto"`` (the tokenizer's BOS when it adds
            one, else nothing), ``"paper"`` (never a BOS: LLM-Pruner's tables) or ``"bos"``. The
            validation perplexity scores the same tokens under each; ``protocol`` says which ran.

    Example:
        >>> dm = PruneDataModule(tokenizer="smollm2", calibration_samples=4)  # doctest: +SKIP
        >>> dm.setup("fit"); dm.calibration_batches  # doctest: +SKIP
        4
    """

    def __init__(
        self,
        calibration_source: str = D.BUILTIN,
        calibration_samples: int = 10,
        calibration_seq_len: int = 64,
        seed: int = 0,
        recovery_source: str | None = None,
        recovery_max_records: int | None = None,
        recovery_epochs: int = 2,
        micro_batch_size: int = 4,
        cutoff_len: int = 256,
        val_source: str | None = None,
        val_seq_len: int = 128,
        val_max_windows: int | None = None,
        tokenizer: str | None = None,
        generation_cache: str = "pruner_cache/generated",
        generation_batch_size: int = 16,
        generation_temperature: float = 1.0,
        generation_top_p: float = 1.0,
        reconstruction_source: str | None = None,
        reconstruction_samples: int = 256,
        reconstruction_seq_len: int = 128,
        window_protocol: str = "auto",
    ) -> None:
        super().__init__()
        from pruner.checks import check_int, check_number

        for name, value in [("calibration_samples", calibration_samples),
                            ("calibration_seq_len", calibration_seq_len),
                            ("recovery_epochs", recovery_epochs), ("micro_batch_size", micro_batch_size),
                            ("cutoff_len", cutoff_len), ("val_seq_len", val_seq_len),
                            ("generation_batch_size", generation_batch_size),
                            ("reconstruction_samples", reconstruction_samples)]:
            check_int(f"`PruneDataModule({name})`", value, 1)
        for name, value in [("recovery_max_records", recovery_max_records),
                            ("val_max_windows", val_max_windows)]:
            if value is not None:
                check_int(f"`PruneDataModule({name})`", value, 1, fix="or None for all")
        check_int("`PruneDataModule(seed)`", seed, 0)
        check_number("`PruneDataModule(generation_temperature)`", generation_temperature, 0.0, low_open=True,
                     fix="1.0 samples the model's own distribution")
        check_number("`PruneDataModule(generation_top_p)`", generation_top_p, 0.0, 1.0, low_open=True,
                     fix="1.0 keeps the whole distribution, 0.95 drops its least likely 5 %")
        if calibration_seq_len < 2:
            raise PrunerError(f"`PruneDataModule(calibration_seq_len={calibration_seq_len})` must be >= 2 (a window "
                              "predicts its next tokens); the paper uses 64")
        check_int("`PruneDataModule(reconstruction_seq_len)`", reconstruction_seq_len, 2)
        for name, value in [("calibration_source", calibration_source), ("recovery_source", recovery_source),
                            ("val_source", val_source), ("tokenizer", tokenizer),
                            ("reconstruction_source", reconstruction_source), ("generation_cache", generation_cache)]:
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise PrunerError(f"`PruneDataModule({name}={value!r})` must be a non-empty string (a name, file or "
                                  "folder)" + ("" if name in ("calibration_source", "generation_cache") else ", or None"))
        if window_protocol not in D.PROTOCOLS:
            raise PrunerError(f"`PruneDataModule(window_protocol={window_protocol!r})` must be one of "
                              f"{', '.join(D.PROTOCOLS)}: 'auto' starts each window with BOS when the tokenizer adds "
                              "one, 'paper' never does (LLM-Pruner's tables)")
        self.save_hyperparameters()
        self.protocol: str | None = None  # the window protocol that ran ("paper" or "bos"), set by setup
        self._bos: int | None = None  # the BOS token the "bos" protocol puts first (generated prompts too)
        self.tokenizer = None
        self.calibration: torch.Tensor | None = None
        self.recovery: list[dict] | None = None
        self.teacher_states: torch.Tensor | None = None  # (records, cutoff_len - 1, hidden), generated text only
        self.val_windows: torch.Tensor | None = None
        self.reconstruction: torch.Tensor | None = None  # this rank's reconstruction windows
        self._rank, self._world = 0, 1
        self._train_loader: _ResumableLoader | None = None

    # ------------------------------------------------------------------ setup

    def _get_tokenizer(self):
        if self.tokenizer is None:
            if self.hparams.tokenizer is not None:
                self.tokenizer = D.load_tokenizer(self.hparams.tokenizer)
            elif self._trainer_module() is not None and getattr(self._trainer_module(), "tokenizer", None):
                self.tokenizer = self._trainer_module().tokenizer
            else:
                raise PrunerError(
                    "PruneDataModule has no tokenizer: pass `tokenizer=<model name or folder>` or "
                    "use it in a Trainer together with a module that has a `tokenizer` attribute"
                )
        return self.tokenizer

    def _trainer_module(self):
        return self.trainer.lightning_module if self.trainer is not None else None

    @property
    def pad_id(self) -> int:
        tok = self._get_tokenizer()
        return next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self._rank, self._world = self.trainer.global_rank, self.trainer.world_size
        hp, tok = self.hparams, self._get_tokenizer()
        self.protocol, self._bos = D.resolve_protocol(tok, hp.get("window_protocol", "auto"))
        if GENERATED in (hp.recovery_source, hp.get("reconstruction_source")):
            from pruner.checks import check_writable_folder

            # generated text is written there before calibration: refuse an unwritable cache now
            check_writable_folder("`PruneDataModule(generation_cache)`", hp.generation_cache,
                                  "give a folder you can write to (shared by all ranks)")
        if stage in (None, "fit") and self.calibration is None:
            if hp.calibration_samples < self._world:
                raise PrunerError(
                    f"calibration_samples={hp.calibration_samples} is fewer than the "
                    f"{self._world} ranks: use at least one calibration sample per rank"
                )
            windows = D.calibration_samples(hp.calibration_source, tok, hp.calibration_samples,
                                            hp.calibration_seq_len, hp.seed, self.protocol)
            per_rank = hp.calibration_samples // self._world  # equal counts: no rank waits
            self.calibration = windows[self._rank :: self._world][:per_rank]
            # generated text needs the loaded model: made in train_dataloader
            self.recovery = self._load_recovery(tok) if hp.recovery_source and hp.recovery_source != GENERATED else []
            source = hp.get("reconstruction_source")
            if source and source != GENERATED and self.reconstruction is None:
                self.reconstruction = self._shard(D.calibration_samples(
                    source, tok, hp.reconstruction_samples, hp.reconstruction_seq_len, hp.seed + RECONSTRUCTION_SEED,
                    self.protocol))
        if stage in (None, "fit", "validate", "test") and hp.val_source and self.val_windows is None:
            windows = D.eval_windows(D.eval_text_rows(hp.val_source), tok, hp.val_seq_len, self.protocol)
            self.val_windows = windows[: hp.val_max_windows]

    def _load_recovery(self, tok) -> list[dict]:
        hp = self.hparams
        if _is_plain_text(hp.recovery_source):
            # Plain text (e.g. "builtin" for an offline run): language-modelling windows of
            # cutoff_len tokens, drawn with another seed than the calibration windows.
            n = hp.recovery_max_records or DEFAULT_TEXT_RECOVERY_WINDOWS
            windows = D.calibration_samples(hp.recovery_source, tok, n, hp.cutoff_len, hp.seed + RECOVERY_SEED,
                                            self.protocol)
            return [{k: v.tolist() for k, v in window_batch(w).items()} for w in windows]
        records = D.alpaca_records(hp.recovery_source, hp.recovery_max_records)
        examples = [D.tokenize_instruction(r, tok, hp.cutoff_len) for r in records]
        # A prompt that fills cutoff_len leaves no response token to learn: its loss is NaN.
        examples = [e for e in examples if any(t != D.IGNORE_INDEX for t in e["labels"])]
        if len(examples) < hp.micro_batch_size * self._world:
            raise PrunerError(
                f"{hp.recovery_source} yields {len(examples)} usable examples, fewer than one "
                f"micro-batch of {hp.micro_batch_size} per rank: add records, lower "
                "micro_batch_size or raise cutoff_len"
            )
        return examples

    @property
    def calibration_batches(self) -> int:
        """Number of leading train batches (on this rank) that are calibration windows."""
        if self.calibration is not None:
            return len(self.calibration)
        world = self.trainer.world_size if self.trainer is not None else 1
        return self.hparams.calibration_samples // world

    def _shard(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``windows``; every rank gets the same count (no rank waits)."""
        if len(windows) < self._world:
            raise PrunerError(f"reconstruction_samples={len(windows)} is fewer than the {self._world} ranks: "
                              "use at least one reconstruction window per rank")
        return windows[self._rank :: self._world][: len(windows) // self._world]

    def reconstruction_batches(self) -> list[torch.Tensor]:
        """This rank's reconstruction windows as ``(micro_batch_size, reconstruction_seq_len)``
        input_ids batches (empty without ``reconstruction_source``). ``StructuralPruneCallback``
        runs them forward at the prune step for its refit's input statistics."""
        if not self.hparams.get("reconstruction_source"):
            return []
        if self.reconstruction is None:
            self.setup("fit")
        if self.reconstruction is None:  # generated: made by train_dataloader, before calibration
            raise PrunerError("reconstruction_source='generated' is written by the dense model when the train "
                              "loader is built; call train_dataloader() first")
        return list(self.reconstruction.split(self.hparams.micro_batch_size))

    # ------------------------------------------------------------------ loaders

    def _pruning_state(self):
        """(the causal LM, its pruning plan or None): through the trainer's pruning callback
        when there is one (it knows where the model is and whether it is pruned yet)."""
        from pruner.callbacks import StructuralPruneCallback
        from pruner.io import find_causal_lm

        module = self._trainer_module()
        if module is None:
            raise PrunerError("'generated' text is written by the model of the trainer's LightningModule: use the "
                              "data module inside Trainer.fit")
        callback = next((c for c in self.trainer.callbacks if isinstance(c, StructuralPruneCallback)), None)
        if callback is not None and callback.model_path is not None:
            return callback.model(module), callback.plan
        return find_causal_lm(module)[1], None

    def _generation_kwargs(self, seed_offset: int, plan) -> dict:
        """Settings shared by every ``generate_samples`` call (cache, resume, chunking)."""
        hp = self.hparams
        return dict(seed=hp.seed + seed_offset, cache_dir=hp.generation_cache,
                    fingerprint=plan.model["fingerprint"] if plan is not None else None,
                    chunk_size=hp.get("generation_batch_size", 16),
                    # a checkpoint from before these options sampled at (1.0, 0.95)
                    temperature=hp.get("generation_temperature", 1.0), top_p=hp.get("generation_top_p", 0.95))

    def _generate(self, n: int, seq_len: int, seed_offset: int,
                  save_states: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` windows the dense model writes (every rank generates its share of the chunks
        into the shared cache, then all read all of them), and with ``save_states`` their
        teacher states (None when the cache lacks some: a resumed run cannot compute them);
        needs the trainer's module."""
        from pruner.data.generated import generate_samples, read_states
        from pruner.structure import model_fingerprint

        model, plan = self._pruning_state()
        kwargs = self._generation_kwargs(seed_offset, plan)
        # once for the three calls below (under FSDP2 it gathers every parameter)
        kwargs["fingerprint"] = kwargs["fingerprint"] or model_fingerprint(model)
        tok = self._get_tokenizer()
        kwargs["prompt_bos"] = self._bos  # resolved by setup, which runs before any loader
        allow = plan is None  # a pruned model must not write it (resumed run: read the dense model's cache)
        generate_samples(model, tok, n, seq_len, rank=self._rank, world_size=self._world, read_all=False,
                         allow_generation=allow, progress=self._rank == 0, save_states=save_states and allow,
                         **kwargs)
        if self.trainer is not None:
            self.trainer.strategy.barrier("pruner-generated")
        windows = generate_samples(model, tok, n, seq_len, allow_generation=False, **kwargs)
        if not save_states:
            return windows, None
        hidden = plan.model["hidden_size"] if plan is not None else model.get_output_embeddings().weight.shape[1]
        return windows, read_states(n, seq_len, hidden_size=hidden, **kwargs)  # the dense teacher's width

    def _wants_teacher_states(self) -> bool:
        """Whether the module distils from the dense model and takes its teacher's logits as
        output-layer inputs saved while the text is written (``module.wants_teacher_states``),
        and the dense model's logits are that layer's output (one short forward pass checks)."""
        from pruner.data.generated import output_layer_reproduces_logits

        module = self._trainer_module()
        if not getattr(module, "wants_teacher_states", False):
            return False
        model, plan = self._pruning_state()
        return plan is not None or output_layer_reproduces_logits(model)  # resumed: the cache says

    def _generated_recovery(self) -> tuple[list[dict], torch.Tensor | None]:
        """Recovery windows the dense model writes itself (the stream shards the batches), and
        their teacher states when the module takes them."""
        hp = self.hparams
        # the refit's generated text, when it has the recovery's window length, serves both (its
        # cached chunks are reused: the text is written once, which halves the generation time)
        shared = hp.get("reconstruction_source") == GENERATED and hp.reconstruction_seq_len == hp.cutoff_len
        windows, states = self._generate(hp.recovery_max_records or DEFAULT_GENERATED_SAMPLES, hp.cutoff_len,
                                         RECONSTRUCTION_SEED if shared else GENERATED_RECOVERY_SEED,
                                         save_states=self._wants_teacher_states())
        return [{k: v.tolist() for k, v in window_batch(w).items()} for w in windows], states

    def train_dataloader(self) -> DataLoader:
        if self.calibration is None:
            self.setup("fit")
        if self.hparams.recovery_source == GENERATED and not self.recovery:
            self.recovery, self.teacher_states = self._generated_recovery()
        hp = self.hparams
        if hp.get("reconstruction_source") == GENERATED and self.reconstruction is None \
                and self._pruning_state()[1] is None:  # resumed after pruning: the refit is done, no text needed
            self.reconstruction = self._shard(self._generate(hp.reconstruction_samples, hp.reconstruction_seq_len,
                                                             RECONSTRUCTION_SEED)[0])
        stream = _TrainStream(self.calibration, self.recovery or [], self.hparams.micro_batch_size,
                              self.hparams.recovery_epochs, self.hparams.seed, self.pad_id,
                              self._rank, self._world, self.teacher_states)
        self._train_loader = _ResumableLoader(stream)
        return self._train_loader

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Train batches carry their position in the pass: record it for resumable checkpoints
        # and drop it, so that the model and user hooks see only model inputs.
        if isinstance(batch, dict) and STREAM_INDEX in batch:
            batch = dict(batch)
            index = int(batch.pop(STREAM_INDEX))
            if self._train_loader is not None:
                self._train_loader.consumed = index + 1
        return batch

    def _windows_loader(self) -> DataLoader | list:
        if not self.hparams.val_source:
            return []  # Lightning skips validation when the loader list is empty
        if self.val_windows is None:
            self.setup("validate")
        unscored = 1 if self.protocol == "bos" else 0  # the first text token follows BOS: not scored
        return DataLoader(TensorDataset(self.val_windows), batch_size=self.hparams.micro_batch_size,
                          collate_fn=lambda rows: window_batch(torch.stack([r[0] for r in rows]), unscored))

    def val_dataloader(self) -> DataLoader | list:
        return self._windows_loader()

    def test_dataloader(self) -> DataLoader | list:
        return self._windows_loader()
