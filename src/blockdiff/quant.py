"""Weight storage for CPU inference: 4-bit groups where the weights are 4-bit, int8, bfloat16.

A one-token decoding step is a chain of matrix-vector products bound by reading the weights, so
fewer bytes per weight is speed. SmolLM2's weights come from a Q4_1 GGUF: every projection is
already on a 4-bit grid per group of 32 (a step and a minimum per group), and the tied embedding
is Q8_0 (a step per group of 32, 255 levels). `Int4Linear` recovers that grid and stores the
very same weights as codes for blockdiff's compiled kernel (`csrc/lowbit.cpp`: 4 bits, or 8 for
255 levels, summed in float32), or, where it cannot be built, for torch's int4 CPU kernel
(`_weight_int4pack_mm_for_cpu`; 255-level groups as two 4-bit planes): no rounding of any weight,
only the per-group step and offset are held as bfloat16 values (torch's kernel wants them so;
both layouts hold the same). A low-rank delta (LoRA) over such a base stays unmerged beside it
(factors in bfloat16, summed in float32), so the adapted model keeps the base's exact 4-bit
weights.

The 4-bit product's cost grows with the rows of a forward, a bfloat16 GEMM's barely (the measured
table: BENCHMARKS.md, `benchmarks/cost_table.py`), so `ByWidth` keeps both and a `WidthSwitch`
picks per forward.
`Int8Linear` (per-output-channel int8, any weights) is the lossy option for weights on no grid.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

GROUP = 32
# Forwards over a cache feeding at most this many tokens per sequence take the 4-bit kernel,
# others bfloat16: the crossover of the measured per-forward cost table (benchmarks/cost_table.py),
# with the tile kernel (NARROW_ROWS_TILES) or without it (NARROW_ROWS; `narrow_rows`).
NARROW_ROWS, NARROW_ROWS_TILES = 4, 16
# From this many tokens per sequence, 4-/8-bit codes are multiplied on AMX tiles where the CPU
# has them (csrc/tiles.cpp: its cost grows slowly with rows up to 16), below by csrc/lowbit.cpp
# (faster for one row). Per sequence, not per forward: a row's kernel never depends on its batch.
# The native step has the same constant (its TILE_TOKENS; a test checks they agree).
TILE_TOKENS = 2
# The rows oneDNN lays a packed bfloat16 weight out for (a hint: any width runs, with the same
# bits); the fastest of 8, 32 and 128 for SmolLM2's forwards of 1 to 64 rows (measured, 128).
PACK_ROWS = 128


@functools.cache
def tiles() -> bool:
    """Whether 4-/8-bit codes are also held for the tile kernel here (AMX, the extension built)."""
    lowbit = _native()
    return lowbit is not None and lowbit.tiles_usable()


def narrow_rows() -> int:
    """The int4 runtime's switch point on this machine (NARROW_ROWS[_TILES])."""
    return NARROW_ROWS_TILES if tiles() else NARROW_ROWS


# How `project` multiplies: a dense matrix, int8 per channel, int4 in one or two 4-bit planes
# (the tensors of `packed()`; an int4 projection's low-rank delta, if any, follows its planes), a
# bfloat16 matrix in oneDNN's own blocked layout, 4-bit or 8-bit codes in the compiled kernel's
# layout (csrc/lowbit.cpp: codes, steps, offsets; the tiles' codes and scales, empty without
# AMX; then the delta, if any: A, B, B's nonzero columns, and A, B as tiles).
DENSE, INT8, INT4, INT4X2, PACKED, LOWBIT4, LOWBIT8 = 0, 1, 2, 3, 4, 5, 6
TILED = 2  # LOWBIT4/8 + TILED: the same codes, on tiles at every width (`WidthSwitch.tile_tokens` 1)


def project(x: Tensor, kind: int, out: int, ts: list[Tensor], tiled: bool = False) -> Tensor:
    """x W^T for a projection stored as `kind` (TorchScript-compatible: the runtime's decoder
    loop calls it from a compiled graph on 2-D activations, the modules' `forward` from Python:
    one implementation; no operation is spent where none is needed). Kinds and the group size
    are literals: TorchScript reads no module-level values. `tiled`: 4-/8-bit codes on AMX tiles
    where they are held so and x is bfloat16 (a forward of several tokens per sequence)."""
    if kind == 0:  # DENSE
        return torch.nn.functional.linear(x, ts[0])
    if kind == 4:  # PACKED
        return torch.ops.mkldnn._linear_pointwise(x, ts[0], None, "none", [], "")
    k = x.shape[-1]
    flat = x if x.dim() == 2 else x.reshape(-1, k)
    low = flat  # the low-rank delta reads the activations as given, in float32
    used = 3
    if kind >= 5:  # LOWBIT4, LOWBIT8: codes, steps, offsets, tile codes, tile scales
        if torch.jit.is_scripting():  # the compiled loop cannot call the kernel: FusedLayers never
            raise RuntimeError("4-/8-bit codes are read by the native step only")  # routes them here
        used = 5
        bits = 4 if kind % 2 == 1 else 8  # 5, 7: 4 bits; 6, 8: 8 bits
        if (tiled or kind >= 7) and ts[3].numel() > 0 and flat.dtype == torch.bfloat16:
            y = _native().tiles_mm(flat, ts[3], ts[4], bits, out)
        else:
            y = _native().lowbit_mm(flat, ts[0], ts[1], ts[2], bits, k)
    else:
        if flat.dtype != torch.bfloat16:
            flat = flat.to(torch.bfloat16)
        if kind == 1:  # INT8
            y = torch._weight_int8pack_mm(flat, ts[0], ts[1])
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, ts[0], 32, ts[1])
            planes = kind - 1
            used = 2 * planes
            if planes == 2:
                y = y + torch._weight_int4pack_mm_for_cpu(flat, ts[2], 32, ts[3])
            if y.shape[1] != out:  # the kernel packs rows in sixteens
                y = y.narrow(1, 0, out)
    if kind >= 2 and len(ts) > used:
        y = y + (low.float() @ ts[used].float() @ ts[used + 1].float()).to(y.dtype)
    if x.dim() == 2:
        return y
    shape = list(x.shape[:-1])
    shape.append(out)
    return y.reshape(shape)


def _native():
    from . import native  # the compiled kernels: only where a projection is stored for them

    return native.module()


class NotOnGrid(ValueError):
    """The weights are not on a 4-bit (or 255-level) grid per group: int4 would round them."""


def _grid(w: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """(integer codes [N, K] in 0..levels, step [N, K/G], offset [N, K/G]) with
    w = offset + step * code exactly (to float32 rounding), or None if w is on no such grid.

    Q4_1 puts a group's minimum at code 0 and its maximum at code 15; Q8_0 is symmetric, its
    absolute maximum at code ±127: both grids follow from the group's own extremes."""
    n, k = w.shape
    g = w.reshape(n, k // GROUP, GROUP).double()
    if levels == 15:
        lo, hi = g.amin(-1), g.amax(-1)
    else:
        hi = g.abs().amax(-1)
        lo = -hi
    step = (hi - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    code = torch.round((g - lo[..., None]) / safe[..., None])
    back = lo[..., None] + code * step[..., None]
    tol = 1e-5 * g.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    if not bool(((back - g).abs() <= tol).all()) or bool((code < 0).any() | (code > levels).any()):
        return None
    return code.reshape(n, k).long(), step.float(), lo.float()


class Int4Linear(nn.Module):
    """y = x W^T (+ x A^T B^T, a low-rank delta) with W held exactly as 4- or 8-bit codes per
    group of 32: the compiled kernel's layout, else torch's int4 kernel's (one or two planes)."""

    def __init__(self, weight: Tensor, low_rank: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        if self.in_features % GROUP:
            raise NotOnGrid(f"in_features {self.in_features} is not a multiple of {GROUP}")
        planes = []
        if (grid := _grid(w, 15)) is not None:
            code, step, lo = grid
            planes.append((code, step, lo + 8 * step))  # the kernel computes (q - 8) * s + z
        elif (grid := _grid(w, 254)) is not None:  # Q8_0: code = 16 h + l, two 4-bit planes
            code, step, lo = grid
            planes.append((code // 16, 16 * step, lo + 128 * step))
            planes.append((code % 16, step, 8 * step))
        else:
            raise NotOnGrid("weights are not on a 4-bit or 8-bit grid per group of 32")
        self.planes = len(planes)
        self.low_rank = None
        lowbit = _native()
        if lowbit is not None:  # the compiled kernel's layout: one set of codes, 4 or 8 bits
            # the very weights torch's kernel would hold (step and offset rounded to bfloat16):
            # sum over planes of (q - 8) s + z, the first plane's step 16x the second's
            s = [p[1].bfloat16().float() for p in planes]
            z = [p[2].bfloat16().float() for p in planes]
            code = planes[0][0] if len(planes) == 1 else 16 * planes[0][0] + planes[1][0]
            offset = sum(zi - 8 * si for si, zi in zip(s, z, strict=True))
            bits = 4 * len(planes)
            codes, steps, offsets = lowbit.lowbit_pack(code, s[-1], offset, bits)
            self.register_buffer("codes", codes)
            self.register_buffer("steps", steps)
            self.register_buffer("offsets", offsets)
            # the same weights on AMX tiles (csrc/tiles.cpp), for forwards of several tokens
            none = torch.empty(0, dtype=torch.uint8), torch.empty(0)
            tiled = lowbit.tiles_pack(code, s[-1], offset, bits) if tiles() else none
            self.register_buffer("tile_codes", tiled[0])
            self.register_buffer("tile_scales", tiled[1])
            self.kind = LOWBIT4 if bits == 4 else LOWBIT8
        else:
            self.kind = INT4 if len(planes) == 1 else INT4X2
            self.pad = pad = -self.out_features % 16  # the kernel packs rows in sixteens
            for i, (q, s, z) in enumerate(planes):
                q, s, z = (nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, s, z))
                packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
                self.register_buffer(f"q{i}", packed)
                sz = torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous()
                self.register_buffer(f"sz{i}", sz)
        if low_rank is not None:
            a, b = low_rank
            # bfloat16: half the bytes a step reads; the native step sums in float32, `project`
            # multiplies in float32 (torch's small bfloat16 products take a ~5x slower path)
            self.register_buffer("lr_a", a.detach().t().contiguous().bfloat16())
            self.register_buffer("lr_b", b.detach().t().contiguous().bfloat16())
            # each rank's nonzero columns [lo, hi): a fused projection's B is block-diagonal,
            # and the native step skips the zeros (exactly: they would add nothing)
            nz = self.lr_b != 0
            cols = torch.arange(nz.shape[1])
            lo = torch.where(nz, cols, nz.shape[1]).amin(1)
            hi = torch.where(nz, cols + 1, 0).amax(1)
            self.register_buffer("lr_cols", torch.stack([lo, torch.maximum(lo, hi)], 1).contiguous())
            # A and B again as tile operands: the delta of forwards whose codes run on tiles
            on = self.kind >= LOWBIT4 and tiles()
            none = torch.empty(0, dtype=torch.bfloat16)
            self.register_buffer("lr_a_tiles", _native().tiles_pack_dense(a.detach()) if on else none)
            self.register_buffer("lr_b_tiles", _native().tiles_pack_dense(b.detach()) if on else none)
            self.low_rank = True

    def packed(self) -> tuple[int, int, list[Tensor]]:
        if self.kind >= LOWBIT4:
            ts = [self.codes, self.steps, self.offsets, self.tile_codes, self.tile_scales]
        else:
            ts = [self.q0, self.sz0] + ([self.q1, self.sz1] if self.planes == 2 else [])
        low = [self.lr_a, self.lr_b, self.lr_cols] if self.low_rank else []
        if self.low_rank and self.kind >= LOWBIT4:
            low += [self.lr_a_tiles, self.lr_b_tiles]
        return self.kind, self.out_features, ts + low

    def forward(self, x: Tensor, tiled: bool = False) -> Tensor:
        return project(x, *self.packed(), tiled=tiled)


NOT_COPIED = (
    "a prepared model (load_model(path), runtime.prepare) holds compiled code and packed weights "
    "and cannot be copied or pickled: copy or save the unprepared model (load_model(path, None)) "
    "and prepare each copy"
)


class PackedLinear(nn.Module):
    """y = x W^T in bfloat16 with W reordered once, at load, into oneDNN's blocked layout: torch's
    bfloat16 linear on a CPU is the same oneDNN kernel but reorders W on every call. The same
    bits as `F.linear` (tested), in less time at every width (BENCHMARKS.md: the cost table).
    Where oneDNN has no bfloat16 (`can_pack`), the runtime keeps dense weights."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS))

    def packed(self) -> tuple[int, int, list[Tensor]]:
        return PACKED, self.out_features, [self.weight]

    def __reduce_ex__(self, protocol):
        raise TypeError(NOT_COPIED)

    def forward(self, x: Tensor) -> Tensor:
        return project(x, *self.packed())


def can_pack(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 weights can be held in oneDNN's layout on `device`: a CPU whose oneDNN
    has bfloat16, and a small packed product there equal to `F.linear`'s (checked once)."""
    return torch.device(device).type == "cpu" and _packing_works()


@functools.cache
def _packing_works() -> bool:
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        w, x = torch.randn(48, 64).bfloat16(), torch.randn(3, 64).bfloat16()
        return torch.equal(PackedLinear(w)(x), torch.nn.functional.linear(x, w))
    except Exception:  # an oneDNN without these kernels: dense weights
        return False


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

    def packed(self) -> tuple[int, int, list[Tensor]]:
        return INT8, self.out_features, [self.weight, self.scale]

    def forward(self, x: Tensor) -> Tensor:
        return project(x, *self.packed())


class WidthSwitch:
    """Which copy a forward uses, set once per forward by the model (`BlockDiffLM.forward`): the
    4-bit codes for a forward over a cache that feeds at most `narrow_rows()` tokens per sequence
    (on tiles from TILE_TOKENS), bfloat16 for anything else (a prompt, a wide step). The rule
    reads neither the batch size nor the padding, so a row takes the same kernels alone or
    batched: batching never changes its numbers (the engine's batched = unbatched rule)."""

    def __init__(self, rows: int | None = None):
        self.rows, self.wide, self.tiled = narrow_rows() if rows is None else rows, True, False
        self.tile_tokens = TILE_TOKENS  # 1: tiles at every width (runtime.tiles_from)

    def set(self, fed: int, cached: int) -> None:
        self.wide = cached == 0 or fed > self.rows
        self.tiled = fed >= self.tile_tokens  # as the native step chooses (csrc/step.cpp)


class ByWidth(nn.Module):
    """A projection held twice: `narrow` (4-bit) and `wide` (bfloat16), picked by the switch."""

    def __init__(self, narrow: nn.Module, wide: nn.Module, switch: WidthSwitch):
        super().__init__()
        self.narrow, self.wide, self.switch = narrow, wide, switch
        self.in_features, self.out_features = wide.in_features, wide.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.switch.wide:
            return self.wide.forward(x)  # no second dispatch
        return self.narrow.forward(x, self.switch.tiled)


def quantize_int8(model: nn.Module) -> nn.Module:
    """The model in bfloat16 with every nn.Linear (projections and LM head) as an Int8Linear; a
    tied LM head gets its own int8 copy, the embedding table stays as it was."""
    model.to(torch.bfloat16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model
