"""Entry point, so that `torchrun --nproc_per_node=N cli.py expand ...` works from the repo root."""
from xlearner.cli import main

if __name__ == "__main__":
    main()
