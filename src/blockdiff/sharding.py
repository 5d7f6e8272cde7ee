"""FSDP2 (`train.parallel: fsdp`): each decoder layer and then the whole model sharded with
PyTorch's `fully_shard`, and the collective gathers a checkpoint needs, so that rank 0 writes the
same files as a single process (and a run resumes on any number of processes).

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


def full_weights(model: nn.Module) -> dict:
    """Every weight by name, gathered in full: collective (every rank calls it); rank 0 gets the
    values, offloaded to CPU, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_opt_state(model: nn.Module, opt: torch.optim.Optimizer, names: list[str]) -> dict:
    """AdamW's state by parameter index in `names` order, gathered in full like `full_weights`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, opt, options=opts).get("state", {})
    return {i: state[n] for i, n in enumerate(names) if n in state}


def restore(
    model: nn.Module, opt: torch.optim.Optimizer, weights: dict, state: dict, names: list[str]
) -> None:
    """Load full weights (trainable ones) and AdamW state by index into the sharded model and
    optimizer, each rank keeping its shard (every rank passes the same full tensors)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    osd["state"] = {names[i]: v for i, v in state.items()}
    set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))
