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
    shard_of        a DTensor (FSDP2's parameter) split by rows: this rank's rows, their place,
                    the group
    sample_rows     chosen elements of a sharded weight, on every rank, without gathering it
    fsdp_records / follow
                    FSDP2's records of where its parameters live, and moving one of them to where
                    parametrize put the parameter (compress_model on a model already sharded)

Gradients. Under DDP or FSDP2 each rank computes its own loss L_r and the wrappers average the
gradients. With the clustering sharded, rank r's gradient is d(sum_q L_q)/dW on its own rows and
zero on the others' (gather_rows's backward sums the ranks' upstream gradients before the op's
backward), so the averaged gradient is d(mean_q L_q)/dW, as without sharding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Rows per palette that a weight sharded by FSDP2 contributes to its initialisation: k-means++ and
# the auto tau run on a sample of this many rows (64 per centroid at 8 bits) drawn from every
# shard, instead of on the whole weight; a palette with fewer rows uses all of them.
INIT_SAMPLE_ROWS = 16384


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


def shard_of(tensor: Tensor) -> tuple[Tensor, int, object]:
    """DTensor `tensor` split along dim 0 (FSDP2's Shard(0); other mesh dimensions, as HSDP's,
    replicate it): this rank's rows, their place among the shards, and the process group across
    which the shards lie."""
    from torch.distributed.tensor import Replicate, Shard
    sharded = [dim for dim, placement in enumerate(tensor.placements) if placement == Shard(0)]
    if len(sharded) != 1 or not all(placement == Replicate()
                                    for dim, placement in enumerate(tensor.placements)
                                    if dim != sharded[0]):
        raise ValueError(f"a DTensor weight split along dim 0 over one mesh dimension (FSDP2's "
                         f"fully_shard) is supported, got placements {tensor.placements}")
    mesh = tensor.device_mesh
    return tensor.to_local(), mesh.get_coordinate()[sharded[0]], mesh.get_group(sharded[0])


def all_finite(local: Tensor, process_group) -> bool:
    """Whether every rank's `local` is finite (the same answer on every rank)."""
    flag = torch.isfinite(local).all().to(torch.int32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=process_group)
    return bool(flag)


def sample_rows(local: Tensor, position: int, elements: Tensor, process_group) -> Tensor:
    """The elements of a weight at flat indices `elements` (any shape), on every rank, from each
    rank's `local` share: the shares are consecutive flat elements in the order of `position`
    (as a split along dim 0 leaves them). Each rank fills the elements it holds and zeros
    elsewhere, and one all-reduce of `elements`' size adds them up (exactly: each element comes
    from one rank)."""
    shares = local.new_zeros((process_group.size(), 2), dtype=torch.int64)
    shares[process_group.rank()] = torch.tensor([position, local.numel()])
    torch.distributed.all_reduce(shares, group=process_group)  # (place, numel) of every share
    start = int(shares[shares[:, 0] < position, 1].sum())
    offsets = elements - start
    mine = (offsets >= 0) & (offsets < local.numel())
    values = local.new_zeros(elements.shape)
    values[mine] = local.reshape(-1)[offsets[mine]]
    torch.distributed.all_reduce(values, group=process_group)
    return values


def fsdp_records(model: nn.Module) -> list:
    """FSDP2's record of every parameter it manages in `model` (the module and attribute name it
    swaps the sharded and the gathered parameter into), after resharding every fully_shard
    module, so that the parameters are the sharded DTensors; [] for a model without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without torch.distributed
        return []
    records = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        module.reshard()
        try:  # FSDP2 keeps these records private (as in torch 2.13)
            state = module._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:
                groups = [group for group in [state._fsdp_param_group] if group is not None]
            records += [param._module_info for group in groups for param in group.fsdp_params]
        except AttributeError:
            raise ValueError("this torch's FSDP2 does not expose where it keeps its parameters: "
                             "call compress_model on the plain model, then fully_shard "
                             "it") from None
    return records


def follow(records: list, module: nn.Module, name: str, owner: nn.Module, owner_name: str) -> None:
    """FSDP2 now swaps the parameter it kept at `module.<name>` at `owner.<owner_name>` instead
    (where parametrize moved it: `module.parametrizations.<name>`, "original")."""
    for info in records:
        if info.module is module and info.param_name == name:
            info.module, info.param_name = owner, owner_name
        for index, (shared, shared_name) in enumerate(zip(info.shared_modules,
                                                           info.shared_param_names)):
            if shared is module and shared_name == name:
                info.shared_modules[index], info.shared_param_names[index] = owner, owner_name
