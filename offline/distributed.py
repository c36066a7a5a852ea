"""torch.distributed for two-tower training: ``torchrun --nproc-per-node N -m offline train ...``.

torchrun starts N copies of the command with RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT
in their environment; ``distributed_session`` joins them into one process group (gloo on CPU,
NCCL on CUDA). Every rank loads the whole dataset and trains on its shard of each step's global
batch; DDP all-reduces the dense gradients (``average_sparse_grads`` the id tables' sparse rows on
CPU), ``gather_batch`` hands every rank the whole global batch as
in-batch negatives, and rank 0 alone validates, decides early stopping (``from_rank0``) and
goes on to the index, ranker, evaluation and bundle. Without torchrun nothing here starts a group
and every helper is the identity of a one-process world.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The current process group's view, or a one-process world when none was started."""
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextmanager
def distributed_session(device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the block when torchrun started this process (WORLD_SIZE
    in the environment): NCCL when training on CUDA, each rank on GPU LOCAL_RANK; gloo on CPU. A
    plain ``python -m offline train`` has no WORLD_SIZE and stays a single process with no group."""
    if "WORLD_SIZE" not in os.environ:
        yield world()
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (LOCAL_RANK) on CUDA."""
    return torch.device("cuda", world().local_rank) if device.type == "cuda" else device


def wrap_ddp(module: nn.Module, device: torch.device, sparse: Sequence[nn.Parameter] = ()) -> nn.Module:
    """``module`` under DistributedDataParallel when there are several ranks (gradients all-reduced
    and averaged in backward), else itself. DDP leaves the ``sparse`` parameters (id tables with sparse
    gradients) alone: ``average_sparse_grads`` synchronises them, and rank 0's values are broadcast
    here as DDP broadcasts the rest."""
    if world().size == 1:
        return module
    own = {id(p) for p in sparse}
    names = [name for name, p in module.named_parameters(remove_duplicate=False) if id(p) in own]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    for p in sparse:
        dist.broadcast(p.data, src=0)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@torch.no_grad()
def average_sparse_grads(params: Sequence[nn.Parameter]) -> None:
    """Replace each parameter's sparse row gradient by its mean over the ranks, as DDP averages dense ones.

    Every rank's touched rows (indices and values) are all-gathered and summed: the traffic and the work
    follow the rows the global batch touched, never the table's size. Two collectives in all, whatever the
    number of tables: the row counts, then every table's rows and values packed into one byte buffer (padded
    to the longest). Each collective is a point where every rank waits for the slowest, a millisecond or more
    on loopback gloo: with three a table, a small step spent more time waiting than computing
    (docs/benchmarks.md, "Distributed training"). (DDP's own sparse all-reduce on gloo corrupted the heap in 5
    of 14 two-process runs, torch 2.13.0.) Every rank must call it with the same parameters after each
    backward; a parameter without a gradient on this rank takes part with no rows."""
    size = world().size
    if size == 1 or not params:
        return
    device = params[0].device
    touched = [_touched(p) for p in params]
    counts = torch.stack(_all_gather(torch.tensor([len(rows) for rows, _ in touched], device=device))).tolist()
    row_bytes = [8 + math.prod(p.shape[1:]) * p.element_size() for p in params]  # its index, its values
    lengths = [sum(n * b for n, b in zip(rank_counts, row_bytes)) for rank_counts in counts]
    own = [part for rows, values in touched for part in (_bytes(rows), _bytes(values))]
    own.append(torch.zeros(max(max(lengths), 1) - lengths[world().rank], dtype=torch.uint8, device=device))
    gathered = _all_gather(torch.cat(own))
    for j, p in enumerate(params):
        rows_of, values_of = [], []
        for rank, buffer in enumerate(gathered):
            at = sum(n * b for n, b in zip(counts[rank][:j], row_bytes[:j]))
            n = counts[rank][j]
            rows_of.append(buffer[at : at + 8 * n].clone().view(torch.long))
            values_of.append(buffer[at + 8 * n : at + n * row_bytes[j]].clone().view(p.dtype).view(n, *p.shape[1:]))
        p.grad = torch.sparse_coo_tensor(torch.cat(rows_of)[None], torch.cat(values_of) / size, p.shape,
                                         check_invariants=False).coalesce()


def _touched(p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
    """A parameter's sparse gradient as (row indices, row values); none for a parameter without one."""
    if p.grad is None:
        return torch.zeros(0, dtype=torch.long, device=p.device), p.new_zeros((0, *p.shape[1:]))
    grad = p.grad.coalesce()
    return grad.indices()[0], grad.values().to(p.dtype)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's memory as a flat uint8 tensor (reinterpreted, not converted: it comes back bit for bit)."""
    return tensor.contiguous().view(-1).view(torch.uint8)


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (the same shape on each), in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world().size)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order. Backward sums the gradient every rank's loss
    sends to each row and keeps this rank's slice: a loss over the gathered rows trains each rank's
    own rows as one process holding the whole batch would."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n_rows = len(rows)
        return torch.cat(_all_gather(rows))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        start = dist.get_rank() * ctx.n_rows
        return total[start : start + ctx.n_rows]


def gather_batch(vectors: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The global batch's ``(vectors, ids)`` (vectors with gradients flowing back to their rank)
    and the column of this rank's first row in it. Every rank must pass the same number of rows.
    One collective: the ids travel as extra columns of the vectors, their bits reinterpreted (never
    converted, so they come back exact) and their gradient, always zero, dropped."""
    w = world()
    if w.size == 1:
        return vectors, ids, 0
    width = vectors.shape[1]
    id_columns = ids.to(torch.long).contiguous().view(-1, 1).view(vectors.dtype)  # [n, 8 / element size]
    rows = _GatherRows.apply(torch.cat([vectors, id_columns], dim=1))
    return rows[:, :width], rows[:, width:].detach().contiguous().view(torch.long).view(-1), w.rank * len(vectors)


def from_rank0(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (its early-stopping decision, the epoch count it chose)."""
    if world().size == 1:
        return int(value)
    tensor = torch.tensor([int(value)], device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over the ranks (one collective; a host sync, so call it rarely)."""
    if world().size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world().size
    return float(value)
