"""The SHARED_PREFIX fast path: positions that every prompt of a group shares, run once.

CLIP's text transformer is causal: the hidden state at position i depends on positions
0..i only.  When the first P positions of N prompts are the same (CoOp's prompts
``[SOS] ctx_1 .. ctx_M [name] . [EOS]`` with one context for all classes: P = M + 1), their
hidden states are the same in every layer and every prompt, so they are computed once; the
remaining positions of each prompt attend to that one copy's keys and values and to their
own.  The attention, the layer norms and the MLPs compute per position what the plain pass
through the blocks computes; only the number of positions each operation sees changes
(and with it, at most, the last bit of a sum).  The plain pass costs N x (P + S) positions
per layer, this one P + N x S, where S is the length after the prefix.

Groups: CoCoOp conditions the context on each image, so the prompts of one image share
their prefix; ``prefix`` holds one row per group and ``suffix`` one block of N prompts per
group (or one block for every group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["supports_shared_prefix", "encode_shared_prefix"]


def _standard_block(block: nn.Module) -> bool:
    """An open_clip residual attention block whose attention this module may redo: packed
    self-attention of ``nn.MultiheadAttention``, batch first, no dropout, no cross-attention."""
    attn = getattr(block, "attn", None)
    return (type(attn) is nn.MultiheadAttention and attn._qkv_same_embed_dim and attn.batch_first
            and attn.in_proj_bias is not None and attn.dropout == 0.0 and not attn.add_zero_attn
            and attn.bias_k is None and not hasattr(block, "ln_1_kv")
            and all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))


def supports_shared_prefix(clip: nn.Module) -> bool:
    """Whether ``clip``'s text transformer is made of standard causal blocks (else: plain path)."""
    blocks = getattr(getattr(clip, "transformer", None), "resblocks", None)
    mask = getattr(clip, "attn_mask", None)
    return bool(blocks) and mask is not None and all(_standard_block(b) for b in blocks)


def _block(block: nn.Module, x: torch.Tensor, groups: int, n_prefix: int, n_prompts: int, mask: torch.Tensor):
    """One residual attention block on the flat positions ``x``: the groups' prefixes
    (groups x n_prefix rows), then every prompt's own positions (groups x n_prompts x S)."""
    attn = block.attn
    width = x.shape[-1]
    heads, head_dim = attn.num_heads, width // attn.num_heads
    split = groups * n_prefix
    length = (x.shape[0] - split) // (groups * n_prompts)
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    # (3, groups, heads, positions, head_dim)
    q_p, k_p, v_p = qkv[:split].view(groups, n_prefix, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q_s, k_s, v_s = qkv[split:].view(groups * n_prompts, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    out_p = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=mask[:n_prefix, :n_prefix])

    def with_prefix(own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        shared = shared.unsqueeze(1).expand(-1, n_prompts, -1, -1, -1).flatten(0, 1)
        return torch.cat([shared, own], dim=2)

    out_s = F.scaled_dot_product_attention(q_s, with_prefix(k_s, k_p), with_prefix(v_s, v_p),
                                           attn_mask=mask[n_prefix:n_prefix + length, :n_prefix + length])
    out = torch.cat([out_p.transpose(1, 2).reshape(split, width), out_s.transpose(1, 2).reshape(-1, width)])
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def encode_shared_prefix(clip: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor, tokens: torch.Tensor,
                         length: int = 0) -> torch.Tensor:
    """Text features of the prompts ``cat([prefix[g], suffix[g, n]])``, group-major:
    ``(groups * N, embed_dim)``, what ``encode_text_embeddings`` gives for those prompts.

    prefix: ``(groups, P, width)`` prompt embeddings shared within a group; suffix:
    ``(groups, N, S, width)`` or ``(N, S, width)`` (the same in every group); tokens:
    ``(N, context)`` the prompts' tokens, whose end-of-text positions must lie after the
    prefix; length: the positions to run (TRUNCATE_TEXT's length; 0: prefix plus suffix)."""
    groups, n_prefix, width = prefix.shape
    if suffix.dim() == 3:
        suffix = suffix.unsqueeze(0).expand(groups, -1, -1, -1)
    n_prompts = suffix.shape[1]
    length = length or n_prefix + suffix.shape[2]
    ends = tokens.argmax(dim=-1)
    positional = clip.positional_embedding[:length].to(prefix.dtype)
    mask = clip.attn_mask[:length, :length]
    mask = mask.to(prefix.dtype) if mask.is_floating_point() else mask
    x = torch.cat([(prefix + positional[:n_prefix]).reshape(-1, width),
                   (suffix[:, :, :length - n_prefix] + positional[n_prefix:]).reshape(-1, width)])
    for block in clip.transformer.resblocks:
        x = _block(block, x, groups, n_prefix, n_prompts, mask)
    own = x[groups * n_prefix:].view(groups * n_prompts, length - n_prefix, width)
    rows = torch.arange(groups * n_prompts, device=own.device)
    last = (ends - n_prefix).repeat(groups)
    return clip.ln_final(own[rows, last]).to(prefix.dtype) @ clip.text_projection
