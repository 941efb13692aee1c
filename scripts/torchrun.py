"""torchrun, with SIGTERM and SIGUSR1 handed to the ranks instead of ending the launch.

    python -m scripts.torchrun [torchrun's arguments] train.py ...   (run_train.sh and slurm_launch.sh do)

torchrun answers SIGTERM by raising SignalException: it signals its ranks, kills them 30 s later
(mid-checkpoint if saving takes longer) and exits 1 with a traceback, even when every rank saved
and exited 0. train.py's ranks answer SIGTERM and SIGUSR1 by finishing the step, saving and exiting
0 (training/preemption.py). So here the launcher passes those two signals on to its ranks and goes on
waiting, and ends as they do: 0 when every rank exited 0. A scheduler that signals every process of
the job reaches the ranks directly as well; a second signal changes nothing. One that comes while no
rank runs (before they start, after they end) ends the launcher as it ends any process. Ctrl-C
(SIGINT), SIGHUP and SIGQUIT keep torchrun's own handling. A rank that fails says why (its traceback),
or leaves its one line (a config error, alike on every rank) in torchrun's error file for the launcher
to print, since torchrun may stop rank 0 before it prints: the launch ends with that rank's exit code
and one line naming it, not torchrun's traceback of its own.
"""

import os
import signal
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

PASSED_ON = (signal.SIGTERM, signal.SIGUSR1)


def ranks() -> list[int]:
    """The process ids of this process's children: torchrun starts no other."""
    parent, children = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, parent pid, ...
        except OSError:  # the process ended meanwhile
            continue
        if fields[1] == parent:
            children.append(int(stat.parent.name))
    return children


def _pass_on(signum: int, frame) -> None:
    children = ranks()
    if not children:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    name = signal.Signals(signum).name
    line = f"torchrun: {name} passed on to {len(children)} rank(s); they finish the step, save and exit"
    os.write(2, (line + "\n").encode())  # not print: the handler may have interrupted a print of the main thread
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> None:
    for signum in PASSED_ON:
        signal.signal(signum, _pass_on)
    # torchrun installs its own handler (the one that raises SignalException) for the signals listed here only.
    try:
        torchrun(["--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT", *argv])
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        said = failure.error_file_data.get("message")
        if os.path.isfile(failure.error_file) and isinstance(said, str):  # train.py's one line (its _say_once)
            print(said, file=sys.stderr)
        print(f"torchrun: rank {rank} exited {failure.exitcode}; its output above says why", file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
