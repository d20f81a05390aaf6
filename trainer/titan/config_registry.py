"""torchtitan config functions (`--module wam.trainer.titan --config <fn>`), built from the project's YAML.

`from_yaml` reads the file named by $WAM_CONFIG (what `wam train` writes into the run directory, and
what a pod mounts from its ConfigMap), so the same YAML describes a laptop run and a 64-GPU job.
"""

from __future__ import annotations

import os

import torch
from torchtitan.components.loss import MSELoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.config import CommConfig, CompileConfig, DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.protocols.model_spec import ModelSpec

from wam.platform.accounting import training_layout
from wam.platform.config import WamConfig, load_config, resolve_preset
from wam.platform.data_contract import check_datasets
from wam.platform.resume import check_resume
from wam.platform.storage import is_remote
from wam.trainer.data.loader import WamDataLoader
from wam.trainer.model.registry import model_config
from wam.trainer.titan.checkpoint_manager import WamCheckpointManager
from wam.trainer.titan.parallelize import parallelize_wam
from wam.trainer.titan.trainer import PromptsNotTokens, WamTrainer

_AC = {"none": None, "full": FullAC.Config, "selective": SelectiveAC.Config}


def trainer_config(cfg: WamConfig) -> WamTrainer.Config:
    """torchtitan's Trainer config for a project config."""
    preset = resolve_preset(cfg)
    t, c = cfg.training, cfg.checkpoint
    precision = t.precision if t.precision != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    tokens = training_layout(preset.arch, preset.sample).length  # sequence length of one sample
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ac = _AC[t.activation_checkpointing]
    return WamTrainer.Config(
        wam=cfg,
        hf_assets_path=str(run_dir),
        dump_folder=str(run_dir),
        model_spec=ModelSpec(name="wam", flavor=preset.name, model=model_config(preset.arch, preset.sample,
                                                                                cfg.model.attention),
                             parallelize_fn=parallelize_wam, pipelining_fn=None, post_optimizer_build_fn=None,
                             state_dict_adapter=None),
        tokenizer=PromptsNotTokens.Config(),
        dataloader=WamDataLoader.Config(arch=preset.arch, sample=preset.sample, data=cfg.data, seed=cfg.seed),
        loss=MSELoss.Config(),  # required by torchtitan; the WAM's flow loss is computed in the train step
        optimizer=OptimizersContainer.Config(implementation="fused" if torch.cuda.is_available() else "foreach",
                                             param_groups=[ParamGroupConfig(
            pattern=r".*", optimizer_name="AdamW",
            optimizer_kwargs={"lr": t.lr, "betas": tuple(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay})]),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=t.warmup_steps,
                                                  decay_type=t.lr_decay, min_lr_factor=0.1),
        metrics=MetricsProcessor.Config(log_freq=t.log_every),
        training=TrainingConfig(local_batch_size=t.batch_size,
                                global_batch_size=t.batch_size * t.grad_accumulation * cfg.world_size,
                                seq_len=tokens, steps=t.steps, max_norm=t.max_grad_norm, dtype="float32",
                                mixed_precision_param=precision, disable_cuda_graphs=True),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor", data_parallel_replicate_degree=t.dp_replicate),
        activation_checkpoint=ac() if ac is not None else None,
        compile=CompileConfig(enable=t.compile, components=["model"]),
        checkpoint=WamCheckpointManager.Config(
            enable=True, folder=cfg.checkpoint_uri if is_remote(cfg.checkpoint_uri) else os.path.abspath(cfg.checkpoint_uri),
            interval=c.interval, keep_latest_k=0, keep_complete=c.keep, last_save_model_only=False,
            initial_load_model_only=False,
            async_mode="async" if c.async_save else "disabled", init_weights=c.init_weights),
        comm=CommConfig(train_timeout_seconds=600),
        debug=DebugConfig(seed=cfg.seed, enable_structured_logging=False),
    )


def from_yaml() -> WamTrainer.Config:
    """The run described by the YAML file at $WAM_CONFIG, checked against its datasets and the checkpoint it
    resumes before anything is built (a UserError here ends every rank with exit code 2)."""
    path = os.environ.get("WAM_CONFIG")
    if not path:
        raise RuntimeError("set WAM_CONFIG to the run's YAML config (`wam train` does this)")
    cfg = load_config(path)
    check_datasets(cfg)
    config = trainer_config(cfg)
    config.resume = check_resume(cfg)
    return config
