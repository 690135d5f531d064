"""The HART transformer and its residual diffusion head (pure PyTorch; no tokenizer, trainer or DeepSpeed)."""

from .blocks import KVCache
from .diffloss import DiffLoss, SimpleMLPAdaLN
from .diffusion import GaussianDiffusion
from .hart_t2i import (
    PRESETS,
    HARTConfig,
    HARTForT2I,
    SampleDraws,
    TextCond,
    TrainDraws,
    hart_config,
)

from .official_layout import load_official_state_dict, official_state_dict

__all__ = [
    "PRESETS", "DiffLoss", "GaussianDiffusion", "HARTConfig", "HARTForT2I", "KVCache", "SampleDraws", "SimpleMLPAdaLN",
    "TextCond", "TrainDraws", "hart_config", "load_official_state_dict", "official_state_dict",
]
