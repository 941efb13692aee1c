"""Document masking of packed windows (``model.attn_mask_type = "block_causal"``).

The loader packs documents joined by EOS into fixed windows. Under ``block_causal`` a
position attends to the earlier positions of its own document only; an EOS belongs to
the document it ends. The mask is built once per forward from the document ids and
shared by every layer: on CUDA a FlexAttention ``BlockMask``, whose 128 x 128 blocks that
no query may see are skipped, so attention costs what the documents cost rather than the
whole window; elsewhere a dense boolean mask for SDPA, which is what the CPU tests run.
``causal`` builds nothing and keeps SDPA's ``is_causal`` (models/transformer.py).
"""

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# Compiled, as PyTorch recommends: eager flex_attention is a reference that materializes the
# scores, and eager create_block_mask evaluates the mask at every position. Inside a compiled
# block (compile.enable) the outer compilation traces through these.
_flex_attention = torch.compile(flex_attention)
_create_block_mask = torch.compile(create_block_mask)

AttentionMask = Union[BlockMask, Tensor]


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """``[batch, seq]`` int32: which document of its window each position is in.

    The number of EOS strictly before the position, so an EOS stays with the document it ends.
    """
    is_eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos


def flex_block_causal_mask(doc_ids: Tensor) -> BlockMask:
    """The ``BlockMask`` of causal attention within each document, for ``flex_attention``."""

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

    batch, seq = doc_ids.shape
    return _create_block_mask(same_document_causal, batch, None, seq, seq, device=doc_ids.device)


def dense_block_causal_mask(doc_ids: Tensor) -> Tensor:
    """The same mask as ``[batch, 1, seq, seq]`` booleans (True: may attend), for SDPA."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def block_causal_mask(doc_ids: Tensor) -> AttentionMask:
    """FlexAttention's sparse mask on CUDA; the dense one elsewhere."""
    return flex_block_causal_mask(doc_ids) if doc_ids.is_cuda else dense_block_causal_mask(doc_ids)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """SDPA's layout, ``[batch, heads, seq, head_dim]``, under either kind of mask."""
    if isinstance(mask, BlockMask):
        return _flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
