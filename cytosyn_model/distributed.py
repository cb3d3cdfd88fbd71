"""One job over N processes (torchrun / ``accelerate launch``): NCCL on GPUs, gloo on CPUs.

Data parallel here means that N ranks x batch B compute what one process computes with batch
N*B (docs/scaling.md):
- :func:`average_gradients`: every parameter that has a gradient after a backward pass gets the mean
  over ranks (one all-reduce per bucket), whichever parameters are trainable at that step: REPA-E
  freezes and unfreezes whole models between its phases and makes the SiT's ``pos_embed``
  trainable after the first VAE phase, which DistributedDataParallel (fixed at wrap time) cannot
  follow;
- :class:`GlobalBatchNorm2d`: train-mode batch normalisation with the per-channel mean and variance
  of the global batch (:func:`global_batch_moments`: an all-reduce of per-channel sums,
  differentiable), the same on every backend (``nn.SyncBatchNorm`` runs on CUDA only); the latent
  BatchNorm and the discriminator's BatchNorms use it;
- :func:`broadcast_module`: rank 0's weights and buffers on every rank at start-up;
- :func:`gather_rows`: small per-rank vectors (loss terms) on every rank, so that every rank logs
  the global means and stops together on a non-finite value.
Without a process group (one process) each function is the identity.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn

from cytosyn_data.core.executors import launched_rank

#: seconds a collective waits for the other ranks before the job fails (a lost rank never hangs it)
DEFAULT_TIMEOUT_S = 600


def launched_world() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch / srun wrappers (1 when not launched)."""
    return launched_rank()[1]


def make_accelerator(mixed_precision: str = "no", timeout_s: float = DEFAULT_TIMEOUT_S):
    """The job's ``Accelerator``: one process per GPU with NCCL, or, without CUDA, one CPU process per
    rank with gloo (accelerate alone would see world 1 on a CPU machine and run N duplicate jobs).
    Collectives time out after ``timeout_s`` seconds."""
    cpu = not torch.cuda.is_available()
    kwargs = {"timeout": timedelta(seconds=timeout_s)}
    if cpu and (launched_world() > 1 or "LOCAL_RANK" in os.environ):  # what accelerate takes for a CPU job
        kwargs["backend"] = "gloo"  # not MPI even where torch has it: one tested path
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(**kwargs)])


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most ``max_bytes`` (or one tensor)."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + nbytes > max_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(params: Iterable[nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """``p.grad <- mean over ranks`` for every parameter of ``params`` that has a gradient, in the
    parameters' order (every rank runs the same graph, so the same parameters have gradients)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size()
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks, differentiable: each rank's output is the sum of every rank's input, so the
    gradient of a rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(t)


def global_batch_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean [C], biased variance [C], element count per channel) of ``z`` [B, C, ...] over the
    batches of every rank, in float32 (float64 input stays float64): two all-reduces, the second
    of squared deviations from the global mean (no E[x^2] - E[x]^2 cancellation)."""
    c = z.shape[1]
    dims = [0, *range(2, z.dim())]
    zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
    count = torch.tensor([z.numel() // c], dtype=zf.dtype, device=z.device)
    sums = _all_reduce_sum(torch.cat([zf.sum(dims), count]))
    n = sums[c]
    mean = sums[:c] / n
    shape = (1, c, *([1] * (z.dim() - 2)))
    var = _all_reduce_sum((zf - mean.view(shape)).pow(2).sum(dims)) / n
    return mean, var, int(round(float(n.detach())))


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys) whose train mode, in a job of
    several processes, normalises with the statistics of every rank's batch and updates the running
    ones with them (unbiased variance), as one process with the global batch would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        mean, var, n = global_batch_moments(x)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = (1, -1, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every ``nn.BatchNorm2d`` replaced by this class (weights and buffers kept)."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (state-dict order)."""
    if not is_distributed():
        return
    for t in module.state_dict().values():
        dist.broadcast(t, src)


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """[world, K]: every rank's vector ``values`` [K] (same K on every rank), on every rank."""
    if not is_distributed():
        return values.reshape(1, -1)
    out = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values.contiguous())
    return torch.stack(out)


def gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank (small objects: RNG states)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def end_job() -> None:
    """Wait for every rank, then close the process group (a no-op in one process)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def start_cpu_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """(rank, world) of a job launched with torchrun / accelerate launch, after joining a gloo process
    group for its barriers (stages that exchange files, not tensors, e.g. evaluation); (0, 1) when
    not launched."""
    if launched_world() <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
