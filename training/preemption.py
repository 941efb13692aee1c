"""SIGTERM / SIGUSR1 (Slurm preemption, the time limit's ``--signal``): finish the step, checkpoint, exit 0."""

import signal

import torch
import torch.distributed as dist


class StopRequest:
    """Records a stop signal; ``agreed`` tells every rank, at the same step, whether any rank got one."""

    def __init__(self):
        self.signal = None
        self._asked = None  # the agreement started by the last call: (flag, its all-reduce)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Ranks get the signal at different moments: stop together once any rank has it. Each call starts the
        ranks' agreement on what they know now and answers with the one the previous call started, so the
        host does not wait for the step just queued (it waits for the one before, already done or nearly).
        A single process asks no one."""
        if dist.get_world_size() == 1:
            return self.signal is not None
        flag = torch.full((1,), 1.0 if self.signal else 0.0, device=device)  # no host-to-device copy to wait on
        previous, self._asked = self._asked, (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))
        if previous is None:
            return False
        answer, work = previous
        work.wait()
        return answer.item() > 0
