"""DKM across the ranks of a torch.distributed process group (docs/design.md §11).

The op itself takes a process group (`dkm(..., process_group=)`): each rank passes its rows, every
pass all-reduces the k x d partial sums. This module holds what the model level adds on top:

    split_sizes     how a layer's rows are split across the ranks (contiguous, sizes differ by <= 1)
    gather_rows     the ranks' clustered rows joined into the whole clustered weight, differentiable
                    (backward: each rank receives the sum over ranks of the gradient of its rows)
    broadcast_      a tensor made equal on every rank to the group's first rank's
    whole           a DTensor (FSDP2's sharded parameter) gathered into a plain tensor; any other
                    tensor as it is
    assign_whole    a whole value written into a parameter, a DTensor keeping only its own shard

Gradients. Under DDP or FSDP2 each rank computes its own loss L_r and the wrappers average the
gradients. With the clustering sharded, rank r's gradient is d(sum_q L_q)/dW on its own rows and
zero on the others' (gather_rows's backward sums the ranks' upstream gradients before the op's
backward), so the averaged gradient is d(mean_q L_q)/dW, as without sharding.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_group(process_group) -> None:
    if process_group is None:
        return
    if not torch.distributed.is_available() or not isinstance(process_group,
                                                             torch.distributed.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (such as "
                        f"torch.distributed.group.WORLD, or a DeviceMesh's mesh.get_group()) or "
                        f"None, got {type(process_group).__name__}")


def split_sizes(rows: int, world_size: int) -> list[int]:
    """Rows per rank: contiguous shares whose sizes differ by at most one, the larger first."""
    base, extra = divmod(rows, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def local_rows(rows: Tensor, process_group) -> Tensor:
    """This rank's share of the rows of (G, M, d) `rows` (split_sizes along M)."""
    sizes = split_sizes(rows.shape[1], process_group.size())
    rank = process_group.rank()
    start = sum(sizes[:rank])
    return rows[:, start:start + sizes[rank]]


def _padded(pieces: list[Tensor], length: int) -> Tensor:
    """(R, G, length, d): each (G, m_r, d) piece padded with zeros to `length` rows."""
    groups, _, dim = pieces[0].shape
    out = pieces[0].new_zeros((len(pieces), groups, length, dim))
    for slot, piece in zip(out, pieces):
        slot[:, :piece.shape[1]] = piece
    return out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, sizes: list[int], process_group) -> Tensor:
        ctx.sizes, ctx.process_group = sizes, process_group
        world = len(sizes)
        longest = max(sizes)
        mine = _padded([local], longest)[0]
        gathered = local.new_empty((world * mine.shape[0], longest, mine.shape[2]))
        torch.distributed.all_gather_into_tensor(gathered, mine.contiguous(), group=process_group)
        gathered = gathered.view(world, *mine.shape)
        return torch.cat([gathered[rank, :, :size] for rank, size in enumerate(sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, group = ctx.sizes, ctx.process_group
        pieces = _padded(list(grad.split(sizes, dim=1)), max(sizes))
        mine = pieces.new_empty(pieces.shape[1:])
        torch.distributed.reduce_scatter_tensor(mine, pieces.reshape(-1, *pieces.shape[2:]),
                                                group=group)
        return mine[:, :sizes[group.rank()]], None, None


def gather_rows(local: Tensor, rows: int, process_group) -> Tensor:
    """(G, M, d) from every rank's (G, m_r, d) share (split_sizes(M)), in rank order."""
    return _GatherRows.apply(local, split_sizes(rows, process_group.size()), process_group)


def broadcast_(tensor: Tensor, process_group) -> Tensor:
    """`tensor` overwritten, on every rank of the group, by its value on the group's first rank."""
    source = torch.distributed.get_global_rank(process_group, 0)
    torch.distributed.broadcast(tensor, src=source, group=process_group)
    return tensor


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without torch.distributed
        return False
    return isinstance(tensor, DTensor)


def whole(tensor: Tensor) -> Tensor:
    """The whole tensor: a DTensor (an FSDP2 shard) is gathered (a collective: every rank of its
    mesh must call this), anything else is returned as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def is_sharded(tensor) -> bool:
    return _is_dtensor(tensor)


@torch.no_grad()
def assign_whole(parameter: Tensor, value: Tensor) -> None:
    """parameter := value (the whole tensor, equal on every rank); a DTensor takes its shard."""
    if _is_dtensor(parameter):
        from torch.distributed.tensor import distribute_tensor
        shard = distribute_tensor(value.to(parameter.device), parameter.device_mesh,
                                  parameter.placements, src_data_rank=None)
        parameter.to_local().copy_(shard.to_local())
    else:
        parameter.copy_(value)
