"""The packed text path of w2s_clip.py: an open_clip text tower that runs the tokens all prompts
share once and each prompt's own tokens packed, so that TP (CoOp) and cpl-text encode k class
prompts per step at a fraction of the cost of k padded 77-token prompts. Equals open_clip's
`encode_text` up to float rounding (tested); only open_clip's ResidualAttentionBlock is packed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from w2s_clip import UserError


class TextTower(nn.Module):
    """The parts of an open_clip CLIP's text tower after the token embedding (shared, not copied).

    `tower(x, eot)` is the plain path: padded prompts, every position. `tower.encode_prefixed(...)`
    runs the first tokens that all prompts share once and each prompt's own tokens packed
    (`packed_text_block`). It takes the plain path instead while `tower.packed` is False:
    set it to force that, and it starts False for any block other than open_clip's
    ResidualAttentionBlock (e.g. its CustomResidualAttentionBlock: qk-norm, cosine attention) or a
    mask other than the causal one (`packable_blocks`).
    """

    def __init__(self, clip_model):
        super().__init__()
        if getattr(clip_model, "attn_mask", None) is None or not hasattr(clip_model, "transformer"):
            raise UserError("TextTower needs open_clip's CLIP with a causal text transformer")
        if getattr(clip_model, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise UserError(f"text pooling '{clip_model.text_pool_type}' is not supported; "
                            f"use a CLIP with an end-of-text token (argmax/eos pooling)")
        self.transformer, self.ln_final = clip_model.transformer, clip_model.ln_final
        self.positional_embedding = clip_model.positional_embedding
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.packed = packable_blocks(clip_model.transformer, clip_model.attn_mask)

    def project(self, x):
        """Final-norm states x [k, w] -> text features [k, d] through the text projection."""
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x if proj is None else x @ proj

    def forward(self, x, eot):
        """Token embeddings x [k, L, w] -> text features [k, d] read at end-of-text positions eot.

        Only the first L positions run: under the causal mask the tokens after the end-of-text
        token cannot change its feature, so L = max(eot) + 1 equals open_clip's 77-token result.
        """
        L = x.shape[1]
        x = x + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:L, :L]))
        return self.project(x[torch.arange(x.shape[0], device=x.device), eot])  # (k, w) -> (k, d)

    def encode_prefixed(self, prefix, own, lengths):
        """Text features [k, d] of k prompts that all start with the same p token embeddings.

        Args:
            prefix: [p, w] embeddings every prompt starts with (SOS, then context or template).
            own: [T, w] each prompt's own embeddings, packed in prompt order, lengths[i] rows for
                prompt i, the last one its end-of-text token (`split_prompts`).
            lengths: [k] long, T = lengths.sum().
        Equals the plain path on prompt i = [prefix, own rows of i] up to float rounding.
        """
        p, (T, w), k = prefix.shape[0], own.shape, len(lengths)
        layout = prompt_layout(lengths)
        if not self.packed:  # plain path: [k, p + max(lengths), w], zeros after each end-of-text
            padded = torch.cat([own, own.new_zeros(1, w)])[layout["gather"]]
            return self(torch.cat([prefix.expand(k, p, w), padded], dim=1), p + lengths - 1)
        pos = self.positional_embedding
        h = torch.cat([prefix + pos[:p], own + pos[p + layout["position"]]])  # (p + T, w)
        blocks = self.transformer.resblocks
        for i, blk in enumerate(blocks):
            h = packed_text_block(blk, h, p, layout, last=i == len(blocks) - 1)
        return self.project(self.ln_final(h))  # h: (k, w), the end-of-text rows


def tokenize_prompts(clip_model, tokenizer, prompts):
    """Token ids [k, L] cut after the longest prompt's end-of-text token, and each eot index [k]."""
    tokens = tokenizer(list(prompts)).to(clip_model.positional_embedding.device)
    eos = getattr(clip_model, "text_eos_id", None)
    if getattr(clip_model, "text_pool_type", "argmax") == "eos" and eos is not None:
        eot = (tokens == eos).int().argmax(dim=-1)
    else:
        eot = tokens.argmax(dim=-1)  # OpenAI BPE: end-of-text has the largest id
    return tokens[:, : int(eot.max()) + 1], eot


def packable_blocks(transformer, attn_mask):
    """Whether `packed_text_block` reproduces every block of an open_clip text transformer.

    True for open_clip's ResidualAttentionBlock with plain self-attention (nn.MultiheadAttention
    with one in-projection, no bias_k/v, no zero-attention, no dropout) under the causal float mask;
    False for anything else (CustomResidualAttentionBlock, cross-attention, another mask).
    """
    from open_clip.transformer import ResidualAttentionBlock
    blocks, L = getattr(transformer, "resblocks", []), attn_mask.shape[-1]
    upper = torch.ones(L, L, dtype=torch.bool, device=attn_mask.device).triu(1)
    causal = (attn_mask.is_floating_point() and attn_mask.shape == (L, L)
              and torch.equal(attn_mask.isneginf(), upper) and not attn_mask[~upper].any())

    def plain(b):
        a = getattr(b, "attn", None)
        return (type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                and isinstance(a, nn.MultiheadAttention) and a._qkv_same_embed_dim
                and a.bias_k is None and not a.add_zero_attn and a.dropout == 0.0)
    return bool(causal) and len(blocks) > 0 and all(plain(b) for b in blocks)


def prompt_layout(lengths):
    """Index tensors that move k prompts' own tokens between packed rows [T] and a padded [k, L].

    Args:
        lengths: [k] long, own tokens of each prompt (>= 1, the last its end-of-text token).
    Returns:
        dict: gather [k, L], the packed row of each padded slot (T past a prompt's end: the
        caller appends a zero row); keep [T], each packed row's slot in the flattened [k * L];
        position [T], each row's index within its prompt's own tokens; last [k], each prompt's
        end-of-text row; lengths [k].
    """
    L = int(lengths.max())
    start = torch.cumsum(lengths, dim=0) - lengths  # (k,)
    j = torch.arange(L, device=lengths.device)
    valid = j < lengths[:, None]  # (k, L)
    keep = valid.flatten().nonzero().squeeze(1)  # (T,)
    return {"gather": torch.where(valid, start[:, None] + j, int(lengths.sum())), "keep": keep,
            "position": keep % L, "last": start + lengths - 1, "lengths": lengths}


def packed_text_block(blk, h, p, layout, last=False):
    """One open_clip ResidualAttentionBlock on a shared prefix and packed per-prompt tokens.

    Rows h[:p] are the prefix every prompt starts with, rows h[p:] the prompts' own tokens packed
    (`prompt_layout`). Layer norms, projections and the MLP run once per row. Attention gives what
    the causal mask gives each whole prompt: prefix row t sees prefix rows <= t, own row j of
    prompt i sees the whole prefix (keys/values shared by all prompts: their gradients add up)
    and its own rows <= j. With last=True only each prompt's end-of-text row is computed.
    Args:
        blk: a block that `packable_blocks` accepts; h: [p + T, w]; p: prefix length.
    Returns:
        [p + T, w], or [k, w] (the end-of-text rows) when last.
    """
    attn, w, (k, L) = blk.attn, h.shape[1], layout["gather"].shape
    W, b = attn.in_proj_weight, attn.in_proj_bias
    y = blk.ln_1(h)
    key, val = F.linear(y, W[w:], None if b is None else b[w:]).chunk(2, dim=-1)  # (p + T, w)
    q = F.linear(y[p + layout["last"]] if last else y, W[:w], None if b is None else b[:w])
    heads = lambda t: t.unflatten(-1, (attn.num_heads, -1)).transpose(-3, -2)  # (.., H, n, w/H)
    pad = lambda t: torch.cat([t[p:], t.new_zeros(1, w)])[layout["gather"]]  # (k, L, w)
    kv = [heads(torch.cat([t[:p].expand(k, p, w), pad(t)], dim=1)) for t in (key, val)]
    j = torch.arange(p + L, device=h.device)
    qpos = (layout["lengths"] - 1)[:, None] if last else j[:L].expand(k, L)  # (k, Lq) query rows
    see = j <= p + qpos[..., None]  # (k, Lq, p + L): the prefix, own rows up to the query's
    out = F.scaled_dot_product_attention(heads(q[:, None] if last else pad(q)), *kv,
                                         attn_mask=see[:, None]).transpose(1, 2).flatten(2)
    if last:  # (k, 1, w): the end-of-text rows only
        x = h[p + layout["last"]] + blk.ls_1(attn.out_proj(out[:, 0]))
    else:
        pre = F.scaled_dot_product_attention(*(heads(t[:p]) for t in (q, key, val)), is_causal=True)
        out = torch.cat([pre.transpose(0, 1).flatten(1), out.flatten(0, 1)[layout["keep"]]])
        x = h + blk.ls_1(attn.out_proj(out))  # (p + T, w)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def shared_prefix_length(tokens, eot):
    """Leading positions whose ids all prompts [k, L] share, leaving each its end-of-text token."""
    same = (tokens == tokens[:1]).all(dim=0).long().cumprod(dim=0)  # (L,) 1 while all agree
    return min(int(same.sum()), int(eot.min()))


def split_prompts(emb, eot, p):
    """Token embeddings [k, L, w] of prompts sharing their first p rows -> encode_prefixed's inputs.

    Returns:
        prefix [p, w] (prompt 0's), own [T, w] (rows p..eot[i] of each prompt, packed in order),
        lengths [k] = eot - p + 1.
    """
    lengths = eot - p + 1
    mine = torch.arange(emb.shape[1] - p, device=emb.device) < lengths[:, None]  # (k, L - p)
    return emb[0, :p], emb[:, p:][mine], lengths
