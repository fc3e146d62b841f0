"""Evaluation shared by several processes, for `python -m modeling_selfie.evaluate` and `evaluate_vqa`:

    torchrun --nproc_per_node N -m modeling_selfie.evaluate --model HF_DIR --dataset refcoco --data-root DATA ...
    accelerate launch --num_processes N -m modeling_selfie.evaluate ...

A launcher starts N copies of the command. Each joins the process group ([`join_launched_processes`]: accelerate's
`PartialState`, which puts the process on `cuda:LOCAL_RANK`, NCCL between processes, or on the CPU, gloo), runs
its contiguous share of the split's forward passes ([`shard`]: the first `len % N` processes take one more) and
hands what it computed to rank 0 ([`gather_to_main`]), which puts the shares together in split order and scores
them once, as one process would; only rank 0 prints and writes. Without a process group every helper is the
identity.
"""

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

LAUNCHED_DEVICES = (None, "auto", "cpu", "cuda")  # --device values that name each process's own local device


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several (`WORLD_SIZE` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_launched_processes(device: str | None = None) -> torch.device:
    """Join the launcher's process group (once per process) and return this process's device.

    Args:
        device: `None` or `"auto"` (`cuda:LOCAL_RANK` where torch sees CUDA, else the CPU), `"cpu"` (every process on
            the CPU, gloo) or `"cuda"` (`cuda:LOCAL_RANK`); a numbered device is refused (`ValueError`), since each
            process takes its own.

    The processes other than rank 0 show no progress bars (transformers' are turned off there).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device not in LAUNCHED_DEVICES:
        raise ValueError(f"each of the {world_size} processes takes its own local device: give cpu or cuda, or leave "
                         f"the device out, not {device!r}")  # fmt: skip
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ValueError("cuda was asked for, but torch sees no CUDA device here")
    state = PartialState(cpu=device == "cpu" or not has_cuda or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes != world_size:
        raise ValueError(f"{world_size} processes were launched but {state.num_processes} joined ({state.device.type})")
    if state.process_index != 0:  # one set of progress bars: rank 0's
        from transformers.utils import logging

        logging.disable_progress_bar()
    return state.device


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_count() -> int:
    """The number of processes sharing the work (1 without a process group)."""
    return dist.get_world_size() if _joined() else 1


def is_main_process() -> bool:
    """Rank 0, or the one process when there is no process group: the one that prints and writes."""
    return not _joined() or dist.get_rank() == 0


def shard(items: Sequence) -> Sequence:
    """This process's contiguous share of `items` (all of them without a process group): process r of N takes
    `items[start:end]`, the first `len(items) % N` processes one item more (as accelerate's
    `split_between_processes`), so the shares in rank order are `items`. Read from `torch.distributed`'s rank and
    world size, so that it also holds in a process group that accelerate did not start."""
    if not _joined():
        return items
    size, extra = divmod(len(items), dist.get_world_size())
    rank = dist.get_rank()
    start = rank * size + min(rank, extra)
    return items[start : start + size + (rank < extra)]


def gather_to_main(value) -> list | None:
    """Every process's `value` (any picklable object), in rank order, on rank 0 (`torch.distributed.gather_object`);
    `None` on the other ranks. `[value]` without a process group."""
    if not _joined():
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value):
    """Rank 0's `value` on every process (`torch.distributed.broadcast_object_list`); `value` without a process
    group."""
    if not _joined():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave() -> None:
    """Leave the process group, if this process joined one (the end of a launched command)."""
    if _joined():
        dist.destroy_process_group()


__all__ = [
    "broadcast_from_main",
    "gather_to_main",
    "is_main_process",
    "join_launched_processes",
    "launched",
    "leave",
    "process_count",
    "shard",
]
