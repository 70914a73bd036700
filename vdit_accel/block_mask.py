"""Block-sparse masks in the CSR-like form the kernels read.

Notation: S tokens, cut into query blocks of ``block_m`` and key blocks of ``block_n`` tokens
(the last block of each may be short). ``Mb = ceil(S / block_m)``, ``Nb = ceil(S / block_n)``.
For every (batch, head, query block) the mask lists the key blocks to visit:

- ``kv_num_blocks``: int32 ``[B, H, Mb]`` — how many key blocks this query block visits;
- ``kv_indices``: int32 ``[B, H, Mb, Nb]`` — their indices, ascending, in the first
  ``kv_num_blocks`` entries (the rest is padding and never read).

``B`` may be 1 to mean "the same for every batch element" (masks depend on the grid, not the sample).
A query block that visits no key block produces zeros (and a log-sum-exp of ``-inf``).
This is the same data FlexAttention's ``BlockMask`` holds, so masks convert both ways for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockMask:
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    seq_len: int
    block_m: int = 128
    block_n: int = 128

    def __post_init__(self):
        if self.kv_num_blocks.dim() != 3 or self.kv_indices.dim() != 4:
            raise ValueError(
                "BlockMask expects kv_num_blocks [B, H, Mb] and kv_indices [B, H, Mb, Nb], got shapes "
                f"{tuple(self.kv_num_blocks.shape)} and {tuple(self.kv_indices.shape)}"
            )
        if self.kv_num_blocks.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise ValueError("BlockMask tensors must be int32")
        b, h, mb = self.kv_num_blocks.shape
        if tuple(self.kv_indices.shape[:3]) != (b, h, mb):
            raise ValueError("kv_indices must share [B, H, Mb] with kv_num_blocks")
        if self.kv_num_blocks.device != self.kv_indices.device:
            raise ValueError("kv_num_blocks and kv_indices must be on one device")
        if mb != cdiv(self.seq_len, self.block_m) or self.kv_indices.shape[3] != cdiv(self.seq_len, self.block_n):
            raise ValueError(
                f"BlockMask for seq_len={self.seq_len} with blocks ({self.block_m}, {self.block_n}) needs "
                f"Mb={cdiv(self.seq_len, self.block_m)}, Nb={cdiv(self.seq_len, self.block_n)}; got "
                f"Mb={mb}, Nb={self.kv_indices.shape[3]}"
            )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, block_bool: torch.Tensor, seq_len: int, block_m: int = 128, block_n: int = 128) -> "BlockMask":
        """From a bool ``[B, H, Mb, Nb]`` (or ``[H, Mb, Nb]``) block-level mask."""
        if block_bool.dim() == 3:
            block_bool = block_bool.unsqueeze(0)
        block_bool = block_bool.to(torch.bool)
        num = block_bool.sum(-1, dtype=torch.int32)
        # Stable sort puts visited blocks first, each group in ascending index order.
        order = torch.argsort((~block_bool).to(torch.int8), dim=-1, stable=True)
        return cls(num.contiguous(), order.to(torch.int32).contiguous(), seq_len, block_m, block_n)

    @classmethod
    def full(cls, seq_len: int, num_heads: int, block_m: int = 128, block_n: int = 128, device=None) -> "BlockMask":
        mb, nb = cdiv(seq_len, block_m), cdiv(seq_len, block_n)
        return cls.from_dense(torch.ones(1, num_heads, mb, nb, dtype=torch.bool, device=device), seq_len, block_m, block_n)

    # -- views ----------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def to(self, device) -> "BlockMask":
        return BlockMask(self.kv_num_blocks.to(device), self.kv_indices.to(device), self.seq_len, self.block_m, self.block_n)

    def to_dense(self) -> torch.Tensor:
        """Bool ``[B, H, Mb, Nb]``: which (query block, key block) pairs are visited."""
        nb = self.num_kv_blocks
        valid = torch.arange(nb, device=self.device) < self.kv_num_blocks.unsqueeze(-1)
        # Padding entries (past the count) go to an extra column that is dropped, so that padding
        # which repeats a listed index cannot erase it.
        idx = torch.where(valid, self.kv_indices.long(), nb)
        out = torch.zeros(*self.kv_indices.shape[:3], nb + 1, dtype=torch.bool, device=self.device)
        out.scatter_(-1, idx, True)
        return out[..., :nb]

    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited, averaged over batch and heads."""
        return float(self.kv_num_blocks.sum()) / (self.kv_num_blocks.numel() * self.num_kv_blocks)

    def density_per_head(self) -> torch.Tensor:
        """Float ``[H]``: the fraction of block pairs each head visits (mean over batch)."""
        return self.kv_num_blocks.float().sum(-1).mean(0) / (self.num_q_blocks * self.num_kv_blocks)

    def token_mask(self) -> torch.Tensor:
        """Bool ``[B, H, S, S]``: the exact token-level mask the block mask applies (for references)."""
        dense = self.to_dense()
        s = self.seq_len
        rows = torch.arange(s, device=self.device) // self.block_m
        cols = torch.arange(s, device=self.device) // self.block_n
        return dense[:, :, rows][:, :, :, cols]

    def head_slice(self, start: int, stop: int) -> "BlockMask":
        return BlockMask(
            self.kv_num_blocks[:, start:stop], self.kv_indices[:, start:stop], self.seq_len, self.block_m, self.block_n
        )

    def __repr__(self) -> str:
        return (
            f"BlockMask(seq_len={self.seq_len}, blocks=({self.block_m}, {self.block_n}), "
            f"shape={tuple(self.kv_num_blocks.shape)}, density={self.density():.3f})"
        )
