"""Ordinary LightningModules that fine-tune a Hugging Face causal LM, written as a user would:
they import nothing from pruner (tests/test_callback_plain.py checks that), so the pruning
callback must work with them as they are.

Batches are the default collation of ``{"input_ids", "attention_mask", "labels"}`` samples.
"""

import lightning as L
import torch
from torch import nn
from transformers import AutoModelForCausalLM


class MyFinetune(L.LightningModule):
    """The issue's example: the model at ``self.model``, AdamW, the model's own loss."""

    def __init__(self, path: str, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


class Backbone(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.lm = AutoModelForCausalLM.from_pretrained(path)
        self.temperature = nn.Parameter(torch.ones(()))  # a parameter of the user's own


class NestedFinetune(L.LightningModule):
    """The model two levels down (``self.backbone.lm``), with a parameter of the user's own."""

    def __init__(self, path: str, lr: float = 1e-3) -> None:
        super().__init__()
        self.backbone = Backbone(path)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        out = self.backbone.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1] / self.backbone.temperature
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class SGDFinetune(MyFinetune):
    """SGD with momentum and weight decay, and a scheduler that steps every optimizer step."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TupleFinetune(MyFinetune):
    """Batches as ``(input_ids, labels)`` tuples: the callback cannot run them itself."""

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return self.model(input_ids=input_ids, labels=labels).loss


class ShardedFinetune(L.LightningModule):
    """FSDP2 as Lightning documents it: the model is built and sharded in ``configure_model``
    (each decoder layer, then the model) on the strategy's data-parallel mesh."""

    def __init__(self, path: str, lr: float = 1e-3) -> None:
        super().__init__()
        self.path, self.lr = path, lr
        self.model = None

    def configure_model(self):
        if self.model is not None:
            return
        from torch.distributed.fsdp import fully_shard

        self.model = AutoModelForCausalLM.from_pretrained(self.path)
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


class HybridShardedFinetune(ShardedFinetune):
    """HSDP: ``fully_shard`` on the strategy's whole 2-D mesh, whose first dimension replicates and
    whose second shards (here ``data_parallel`` x ``tensor_parallel`` = 2 x 1: every rank holds
    whole tensors, as replicas; gradients are all-reduced over the replicas)."""

    def configure_model(self):
        if self.model is not None:
            return
        from torch.distributed.fsdp import fully_shard

        self.model = AutoModelForCausalLM.from_pretrained(self.path)
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=self.device_mesh)
        fully_shard(self.model, mesh=self.device_mesh)


class TensorParallelFinetune(ShardedFinetune):
    """Tensor parallelism on the strategy's ``tensor_parallel`` mesh: the MLPs' down projections
    split along their input dimension (``RowwiseParallel``: weights sharded along dim 1)."""

    def configure_model(self):
        if self.model is not None:
            return
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        self.model = AutoModelForCausalLM.from_pretrained(self.path)
        for layer in self.model.model.layers:
            parallelize_module(layer.mlp, self.device_mesh["tensor_parallel"], {"down_proj": RowwiseParallel()})


MODULES = {cls.__name__: cls for cls in (MyFinetune, NestedFinetune, SGDFinetune, ShardedFinetune,
                                         HybridShardedFinetune, TensorParallelFinetune)}
