"""`python -m xlearner.run.torchrun ARGS` is `torchrun ARGS`, except that a SIGTERM or SIGINT to the launcher
ends it with exit 128+signal and one line, where torchrun's elastic agent prints a traceback and exits 1."""
from __future__ import annotations

import sys


def torchrun(argv: list[str] | None = None) -> None:
    """`torchrun` with a clean exit when the launcher itself is signalled (Kubernetes, SLURM, Ctrl-C).

    On SIGTERM/SIGINT torchrun's elastic agent forwards the signal to its workers
    and waits for them (up to --shutdown-timeout, default 30 s), which is what
    lets every rank finish its step and checkpoint; but then it re-raises a
    SignalException from its signal handler, which prints a traceback and exits
    1 whatever the workers did. Here that exception becomes one line and exit
    128+signal, the code the workers exit with. A failed worker (say a full disk)
    is reported by torchrun's failure table alone, without the agent's traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except ChildFailedError as e:
        print(e, file=sys.stderr, flush=True)  # the table: which rank failed first, its exit code
        raise SystemExit(1) from None
    except SignalException as e:
        print(f"torchrun: {e.sigval.name}: sent to the workers, which checkpoint and exit; "
              "run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(e.sigval)) from None


if __name__ == "__main__":
    torchrun()
