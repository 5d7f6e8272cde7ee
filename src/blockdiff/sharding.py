"""FSDP2 (`train.parallel: fsdp`): each decoder layer and then the whole model sharded with
PyTorch's `fully_shard`, and the views of the training state that torch.distributed.checkpoint
writes shard by shard (a run resumes on any number of processes).

Parameters, gradients and AdamW's moments are sharded over the processes; a layer's parameters are
gathered for its forward and backward only. Mixed precision follows `train.precision` (bf16
parameters and compute, fp32 gradient reduction); `train.cpu_offload` keeps the shards in CPU
memory; `train.activation_checkpointing` recomputes each layer in the backward.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError


def check(t, world: int) -> None:
    """What the processes need (`t`: the recipe's train section), before anything is built."""
    if t.batch_size % (world * t.accumulate):
        raise ConfigError(
            f"train.batch_size {t.batch_size} is not divisible by {world} processes "
            f"x {t.accumulate} micro-batches (train.accumulate)"
        )
    if t.cpu_offload and (t.parallel != "fsdp" or not torch.cuda.is_available()):
        raise ConfigError(
            "train.cpu_offload moves FSDP's GPU shards to CPU memory: it needs train.parallel fsdp "
            "and a GPU (on a CPU the shards are in CPU memory already)"
        )
    if t.parallel == "fsdp" and world < 2:
        raise ConfigError(
            "train.parallel fsdp shards over processes: start it with torchrun --nproc_per_node N "
            "(N >= 2), or use train.parallel ddp in one process"
        )


def init_process_group() -> None:
    """The process group of a torchrun worker. Its keys in the rendezvous store are prefixed with
    torchrun's restart count: after an elastic restart, workers otherwise met the dead group's
    addresses there (gloo: "connection refused" or a hang, about 2 restarts in 3 on this CPU)."""
    import os

    import torch.distributed as dist

    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"blockdiff/attempt-{attempt}", store)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def parallelize(model: nn.Module, t, world: int) -> nn.Module:
    """What the loss calls: the model sharded in place (`t.parallel` fsdp), DDP around it (ddp,
    several processes), or the model itself."""
    if t.parallel == "fsdp":
        shard(model, t.precision, t.cpu_offload, t.activation_checkpointing)
        return model
    return torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model


def shard(model: nn.Module, precision: str, cpu_offload: bool, activation_checkpointing: bool) -> None:
    """Shard `model` in place: every decoder layer, then the root (embeddings, norm, head)."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    bf16 = precision == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp, "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for layer in model.model.layers:
        if activation_checkpointing:
            checkpoint(layer)  # composable: the parameter names stay the same
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered on every rank (collective), or the tensor itself."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full `value` laid out as `target` (this rank's shard of it when `target` is sharded)."""
    if not is_sharded(target):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)


def state_views(model: nn.Module, opt: torch.optim.Optimizer, names: list[str], ema: dict | None) -> dict:
    """Everything a training checkpoint holds, keyed as the trainer state is (`model.<name>`,
    `ema.<name>`, `opt.<i>.<key>` with `names` the optimizer's parameters in order), as this process
    holds it: its shards under FSDP. torch.distributed.checkpoint writes these, and fills them in
    place on load whatever the number of processes that wrote them."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    params = dict(model.named_parameters())
    views = {f"model.{n}": params[n].detach() for n in names}
    views.update({f"ema.{n}": v for n, v in (ema or {}).items()})
    state = get_optimizer_state_dict(model, opt)["state"]
    for i, n in enumerate(names):
        views.update({f"opt.{i}.{k}": v for k, v in state.get(n, {}).items()})
    return views


def restore(
    model: nn.Module, opt: torch.optim.Optimizer, weights: dict, state: dict, names: list[str], full: bool
) -> None:
    """Load trainable weights by name and AdamW state by index in `names` into the model and its
    optimizer: full tensors (`full`: every rank passes the same ones and keeps its shard) or
    tensors laid out as the model's own (what `state_views` filled)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=full, strict=False)
    set_model_state_dict(model, weights, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=full))
    osd["state"] = {names[i]: v for i, v in state.items()}
    set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=full))
