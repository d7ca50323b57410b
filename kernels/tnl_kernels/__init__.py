"""tnl_kernels: the lightning-attention operator (DESIGN.md section 4).

Triton kernels for CUDA, a chunked PyTorch path for everything else, and the
reference forms (:mod:`tnl_kernels.reference`) every path is tested against.
"""

from . import reference
from .api import lightning_attn, lightning_attn_decode
from .chunked import default_block_size
from .moe_dispatch import moe_dispatch
from .sequence_parallel import gather_shards, lightning_attn_sequence_parallel, state_gather_bytes
from .slopes import alibi_base_slopes, build_slopes

__all__ = [
    "lightning_attn",
    "lightning_attn_decode",
    "build_slopes",
    "alibi_base_slopes",
    "default_block_size",
    "reference",
    "moe_dispatch",
    "lightning_attn_sequence_parallel",
    "gather_shards",
    "state_gather_bytes",
]
