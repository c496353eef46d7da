"""Building blocks shared by the U-Net and the VAE (latent diffusion, Rombach et al. 2022).

Module and attribute names follow the diffusers folder format (`norm1`, `to_q`, `to_out.0`,
`ff.net.0.proj`...), so `state_dict()` keys match it; everything is channels-first. No module
owns a buffer, so models build on the meta device and load with `assign=True`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdgen.runtime.kernels import attention_kernel, compiled_attention, geglu_kernel, group_norm_kernel
from sdgen.runtime.token_merging import TokenMerge, plan_merge

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, DDPM (Ho et al. 2020) as diffusers.

    Frequencies are exp(-ln(max_period) * i / (dim/2 - freq_shift)); the result is
    [sin, cos] or [cos, sin] when `flip_sin_to_cos`, always float32, shape (batch, dim).
    """
    half = dim // 2
    # the operation order is diffusers', so that embeddings agree to the last bit
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps.float()[:, None] * freqs[None, :]
    parts = (torch.cos(angles), torch.sin(angles)) if flip_sin_to_cos else (torch.sin(angles), torch.cos(angles))
    embedding = torch.cat(parts, dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP on an embedding vector; `cond_proj` adds a distilled guidance input (LCM)."""

    def __init__(self, in_features: int, dim: int, cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_features, bias=False) if cond_proj_dim else None

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("this model has no time_cond_proj_dim: do not pass a timestep condition")
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """Pre-norm residual block GN-SiLU-conv (+ time embedding) GN-SiLU-conv (DDPM / LDM ResnetBlock)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(group_norm(self.norm1, x, silu=True))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(group_norm(self.norm2, h, silu=True))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; `asymmetric` pads (0, 1, 0, 1) first, as the LDM / SD VAE encoder does."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (2x, or to `size` when the skip has an odd size) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out channels-last (NHWC strides) that is not also plain contiguous."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """norm(x), then SiLU if asked; in one pass of the compiled kernel for bf16 inputs (NCHW or
    channels-last) at inference when the fast path marked the norm `fused` (sdgen.runtime.fast)."""
    if (getattr(norm, "fused", False) and x.dtype == torch.bfloat16 and norm.affine
            and (x.is_contiguous() or is_channels_last(x))
            and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))):
        kernel = group_norm_kernel()
        if kernel is not None:
            return kernel(x, norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps, silu)
    h = norm(x)
    return F.silu(h) if silu else h


# Blocked attention pays off from this many keys on (self-attention); with the 77 keys of a text
# context PyTorch's kernel is as fast and rounds less.
BLOCKED_MIN_KEYS = 256


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False, blocked: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention over (batch, tokens, heads * head_dim) tensors.

    `upcast` computes in float32 for fp16/bf16 inputs: SD 2.x's attention logits overflow fp16.
    `blocked` (the CPU fast path) takes bf16 attention at inference to the compiled kernel where
    there is one (sdgen.runtime.kernels; fp32 scores, so `upcast` holds too), otherwise bf16
    self-attention to `blocked_attention`.
    """
    batch, _, inner = q.shape
    head_dim = inner // heads
    dtype = q.dtype
    if blocked and dtype == torch.bfloat16 and not q.requires_grad:
        kernel = attention_kernel() if head_dim % 2 == 0 else None
        if kernel is not None:
            q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2).reshape(batch * heads, -1, head_dim)
                       for t in (q, k, v))
            out = compiled_attention(kernel, q, k, v, head_dim ** -0.5)
            return out.view(batch, heads, -1, head_dim).transpose(1, 2).reshape(batch, -1, inner)
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if blocked and dtype == torch.bfloat16 and k.shape[2] >= BLOCKED_MIN_KEYS and not q.requires_grad:
        return blocked_attention(q, k, v).transpose(1, 2).reshape(batch, -1, inner)
    if upcast and dtype in _LOW_PRECISION:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)
    return out.to(dtype).transpose(1, 2).reshape(batch, -1, inner)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Attention over (batch, heads, tokens, head_dim) tensors as plain matrix products, one head and
    `block` queries at a time: the fast path's bf16 self-attention where the compiled kernel is not built.

    On CPUs without AMX, PyTorch's flash attention runs SD's bf16 self-attention far below the bf16
    matrix-product rate (head sizes of 40 to 160, and 512 in the VAE); a block's scores (block x
    keys) fit in cache, and this is 1.8x (U-Net, 1024 tokens) to 3.7x (VAE, 4096 tokens) faster
    (bench/RESULTS.md). The weights are rounded to the input dtype before the value product.
    """
    batch, heads, tokens, head_dim = q.shape
    queries = (q * head_dim ** -0.5).reshape(batch * heads, tokens, head_dim)
    keys = k.reshape(batch * heads, -1, head_dim).transpose(1, 2).contiguous()
    values = v.reshape(batch * heads, -1, head_dim)
    out = torch.empty_like(queries)
    for head in range(batch * heads):
        for start in range(0, tokens, block):
            weights = torch.mm(queries[head, start:start + block], keys[head]).softmax(-1)
            torch.mm(weights, values[head], out=out[head, start:start + block])
    return out.view(batch, heads, tokens, head_dim)


class Attention(nn.Module):
    """Multi-head (cross-)attention of the SD transformer: bias-free q/k/v, biased output projection."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.blocked = False  # blocked_attention for bf16 self-attention (set by sdgen.runtime.fast)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast,
                                   self.blocked)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Gated GELU unit (Shazeer 2020): one projection split into value and gate, value * gelu(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)
        self.fused = False  # one pass of the compiled kernel in bf16 (set by sdgen.runtime.fast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.proj(x)
        if self.fused and projected.dtype == torch.bfloat16 and not projected.requires_grad:
            kernel = geglu_kernel()
            if kernel is not None:
                return kernel(projected.contiguous())
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x expansion; `net` indices (0 GEGLU, 1 dropout slot, 2 linear) are the format's."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, merge: TokenMerge | None = None) -> torch.Tensor:
        if merge is None:
            x = x + self.attn1(self.norm1(x))
        else:  # token merging (runtime/token_merging.py): self-attention on fewer tokens
            x = x + merge.unmerge(self.attn1(merge.merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer: GroupNorm, project in, `depth` transformer blocks on h*w tokens, project out, residual.

    Projections are 1x1 convs (SD 1.x) or linear layers on tokens (`linear_projection`, SD 2.x / XL).
    Head size is channels // heads, as diffusers, so inner width may be below `channels`.
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 linear_projection: bool = False, upcast: bool = False):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.token_merging = 0.0  # share of tokens merged before self-attention (set by sdgen.runtime.fast)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, inner, 1), nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, head_dim, context_dim, upcast) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = group_norm(self.norm, x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (b, c, h, w) -> tokens
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            merge = plan_merge(h, height, width, self.token_merging) if self.token_merging else None
            h = block(h, context) if merge is None else block(h, context, merge)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        if not self.linear_projection:
            # permuted tokens are already a channels-last image; the default path copies them to
            # NCHW as diffusers does, which keeps its conv's rounding and so exact fp32 parity
            h = self.proj_out(h if is_channels_last(x) else h.contiguous())
        return x + h


class SelfAttention2d(nn.Module):
    """Single-head self-attention over pixels with GroupNorm and residual (the VAE mid-block attention)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.upcast = False  # attention in float32 for bf16 inputs (set by sdgen.runtime.fast)
        self.blocked = False  # blocked_attention for bf16 inputs (set by sdgen.runtime.fast)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if is_channels_last(x):  # the fast path: tokens are a free view of a channels-last image
            h = group_norm(self.group_norm, x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            h = multi_head_attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1, upcast=self.upcast,
                                     blocked=self.blocked)
            return x + self.to_out[0](h).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        # normalising the (b, c, h*w) view, as diffusers does, keeps results bit-identical
        h = self.group_norm(x.view(batch, channels, height * width)).transpose(1, 2)
        h = multi_head_attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1, upcast=self.upcast,
                                     blocked=self.blocked)
        h = self.to_out[0](h).transpose(1, 2).reshape(batch, channels, height, width)
        # h is a strided view; h + x (not x + h) yields diffusers' memory layout and so its exact rounding
        return h + x


class Stage(nn.Module):
    """One resolution level: `resnets`, optional `attentions` after each, optional down/up sampler.

    The U-Net's down, mid and up blocks and the VAE's blocks are all stages; the attribute names
    are the format's (`down_blocks.0.resnets.1`, `...attentions.0`, `...downsamplers.0.conv`).
    """

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None = None,
                 downsampler: nn.Module | None = None, upsampler: nn.Module | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions or [])
        self.downsamplers = nn.ModuleList([downsampler]) if downsampler is not None else None
        self.upsamplers = nn.ModuleList([upsampler]) if upsampler is not None else None
