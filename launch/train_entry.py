"""Script entry for launchers that need a file to run (torchrun, the deepspeed launcher).

``python launch/train_entry.py ARGS`` is ``slam-pretrain train ARGS``. The deepspeed launcher
puts ``--local_rank=N`` first; the ``train`` subcommand accepts it there.
"""

import sys

from slam_pretrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
