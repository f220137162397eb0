"""The training job under torchrun, recording how many DDP modules are alive when the process
group is destroyed (each holds the group: one left for interpreter exit to free can abort the
finished worker). Usage: ``-m tests.teardown_worker REPORT_DIR TRAIN_FLAGS...``."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from jobs import train


def main() -> None:
    report_dir, flags = Path(sys.argv[1]), sys.argv[2:]
    destroy = dist.destroy_process_group

    def destroy_and_record(*args: object, **kwargs: object) -> None:
        alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        report = report_dir / f"rank{os.environ['RANK']}.json"
        report.write_text(json.dumps({"ddp_modules_alive": alive}))
        destroy(*args, **kwargs)  # type: ignore[arg-type]

    dist.destroy_process_group = destroy_and_record  # type: ignore[assignment]
    train.train.main(flags)


if __name__ == "__main__":
    main()
