"""The DeepSpeed engine, built from the typed config.

The DeepSpeed JSON is generated here from `RunConfig` (never kept by hand) and saved with the run.
The optimizer is torch's AdamW with VAR's parameter groups (no weight decay for 1-D tensors, biases
and the embedding-like names VAR exempts, `train.py:110-116` there); the schedule is a linear warmup
then cosine or linear decay, as a LambdaLR that DeepSpeed checkpoints with the engine.

Precision (`run.dtype`): bf16 is DeepSpeed's bf16 mode. The module's parameters are bf16, so ZeRO-3
gathers and reduces half the bytes of fp32; the optimizer keeps fp32 masters and fp32 Adam moments, and
the EMA and the saved weights follow those masters (`zero_utils.local_master`). The models cast what
enters them to their weights' dtype and keep in fp32 what the field keeps there: norm statistics (RMSNorm
explicitly, BatchNorm explicitly, GroupNorm/LayerNorm by ATen's fp32 accumulation), the logits, softmax and
cross-entropy, the diffusion loss and its schedule, and the quantizer. Explicit casts rather than
DeepSpeed's `torch_autocast`: CPU and CUDA autocast cast different op lists, so CPU tests of an autocast
run would not check the numerics the GPUs compute; with explicit casts both run the same ops in the
same dtypes. fp16 is refused by the config check.

ZeRO-1/2 bucket sizes are set small by default: DeepSpeed's defaults (5e8) made CPU steps 8x slower
in measurements on this project's machines; on GPUs raise them in the config.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from hart_train.models import kernels

# VAR's no-weight-decay names (VAR utils/lr_control.py); matched as substrings of the parameter name.
NO_WD_NAMES = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
    "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups, VAR's rule."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        # ds_shape: under ZeRO-3 the local tensor is a placeholder; the real rank is in ds_shape
        ndim = len(getattr(p, "ds_shape", p.shape))
        if ndim <= 1 or name.endswith(".bias") or any(n in name for n in NO_WD_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def deepspeed_config(cfg, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for `cfg` (a RunConfig)."""
    run, zero = cfg.run, cfg.zero
    zero_cfg: dict = {
        "stage": zero.stage,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_bucket_size": zero.reduce_bucket_size,
        "allgather_bucket_size": zero.allgather_bucket_size,
        "stage3_param_persistence_threshold": zero.param_persistence_threshold,
        "stage3_prefetch_bucket_size": zero.reduce_bucket_size,
        "stage3_max_live_parameters": zero.max_live_parameters,
        "stage3_max_reuse_distance": zero.max_reuse_distance,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if zero.offload_optimizer:
        zero_cfg["offload_optimizer"] = {"device": "cpu", "pin_memory": run.device == "cuda"}
    if zero.offload_param and zero.stage == 3:
        zero_cfg["offload_param"] = {"device": "cpu", "pin_memory": run.device == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": run.grad_accum,
        "gradient_clipping": run.grad_clip,
        "bf16": {"enabled": run.dtype == "bf16"},
        "zero_optimization": zero_cfg,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def build(cfg, model: nn.Module, ds_config: dict):
    """deepspeed.initialize with our optimizer and schedule; returns the engine."""
    import deepspeed

    o = cfg.optim
    groups = param_groups(model.named_parameters(), o.weight_decay)
    if not groups:
        raise ValueError("the stage has no trainable parameters (check which modules it freezes)")
    if cfg.zero.offload_optimizer:  # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised CPU AdamW
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    else:
        optimizer = kernels.adamw(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, device_type=cfg.run.device)
    total = cfg.run.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, o.warmup_steps, total, o.schedule, o.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine
