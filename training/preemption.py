"""SIGTERM / SIGUSR1 (Slurm preemption, the time limit's ``--signal``): finish the step, checkpoint, exit 0."""

import signal

import torch
import torch.distributed as dist


class StopRequest:
    """Records a stop signal; ``agreed`` tells every rank, at the same step, whether any rank got one."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Ranks get the signal at different moments: stop together once any rank has it. A single process
        asks no one (the collective's ``item()`` would wait for the GPU to drain every step)."""
        if dist.get_world_size() == 1:
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0
