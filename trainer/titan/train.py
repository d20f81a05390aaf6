"""Entry point of a training process (one per rank, under torchrun): torchtitan's own `train` main.

    torchrun --nproc_per_node N -m wam.trainer.titan.train --module wam.trainer.titan --config from_yaml

with WAM_CONFIG naming the project YAML. On machines without an accelerator the CPU support module is
loaded first; GPU runs never load it.
"""

import torch

from wam.trainer.titan import compat  # noqa: F401  (torch shims, before torchtitan)

if not torch.cuda.is_available():
    from wam.trainer.titan import cpu  # noqa: F401

from torchtitan.train import main  # noqa: E402

if __name__ == "__main__":
    main()
