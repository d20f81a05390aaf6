"""torchtitan integration: the WAM as a torchtitan model, trained by torchtitan's own Trainer.

Run with `python -m wam.trainer.titan.train --module wam.trainer.titan --config from_yaml` under torchrun
(`wam train` does this); the config function reads the project's YAML named by $WAM_CONFIG.
"""

from wam.trainer.titan import compat  # noqa: F401  (torch shims, before any module here imports torchtitan)
