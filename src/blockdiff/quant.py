"""Weight-only int8 for CPU inference.

A one-token decoding step is a chain of matrix-vector products bound by reading the weights, so
storing them in int8 (one scale per output channel) halves the bytes of bfloat16. Activations stay
bfloat16 (no activation quantisation: that is what cost quality in dynamic int8), and the product
runs in torch's int8-weight kernel (`_weight_int8pack_mm`). Embeddings, norms and the KV cache stay
bfloat16. Inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Int8Linear(nn.Module):
    """y = x W^T with W = int8 weights x per-row scale (symmetric, absmax / 127), no bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias (Llama-style projections have none)")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """The model in bfloat16 with every nn.Linear (projections and LM head) as an Int8Linear; a
    tied LM head gets its own int8 copy, the embedding table stays as it was."""
    model.to(torch.bfloat16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model
