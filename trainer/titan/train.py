"""Entry point of a training process (one per rank, under torchrun): torchtitan's own `train` main.

    torchrun --nproc_per_node N -m wam.trainer.titan.train --module wam.trainer.titan --config from_yaml

with WAM_CONFIG naming the project YAML. On machines without an accelerator the CPU support module is
loaded first; GPU runs never load it. A failure is also written as the pod's termination message
(wam.platform.termination) so that the operator knows whether a restart can help.
"""

import logging
import os
import sys

import torch

from wam.platform import termination
from wam.platform.errors import UserError

if not torch.cuda.is_available():
    from wam.trainer.titan import cpu  # noqa: F401

import torchtitan.train as _titan_train  # noqa: E402
from torchtitan.train import main  # noqa: E402

_init_logger = _titan_train.init_logger


def _init_logger_of_this_rank() -> None:
    """torchtitan's logging, where ranks other than 0 keep only warnings and errors: every rank logs the same
    step metrics and set-up lines, and rank 0's are the job's (its progress file and MLflow run are rank 0's)."""
    _init_logger()
    if int(os.environ.get("RANK", "0")) != 0:
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda record: record.levelno >= logging.WARNING)


_titan_train.init_logger = _init_logger_of_this_rank


def run() -> None:
    try:
        main()
    except UserError as err:
        termination.record(termination.INVALID_INPUT, str(err))
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except BaseException as err:
        if not isinstance(err, SystemExit | KeyboardInterrupt):
            termination.record(termination.ERROR, f"{type(err).__name__}: {err}")
        raise


if __name__ == "__main__":
    run()
