"""The schema of a run: every section a YAML run file under `configs/` may set.

Stage-specific model sections live beside the model they configure (`tokenizer.TokenizerConfig`,
`hart_train.models.HARTConfig`); this file only assembles them. Device, dtype and ZeRO stage are
configuration: the same code runs CPU+gloo and GPU+nccl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from data_tools.reader import ReaderConfig
from data_tools.text_encoder import TextEncoderConfig
from hart_train.lora import LoraSection
from hart_train.models import HARTConfig
from hart_train.models.buckets import stage_buckets
from tokenizer.autoencoder import TokenizerConfig
from tokenizer.losses import TokenizerLossConfig

StageName = Literal["tokenizer-vq", "tokenizer-hybrid", "t2i"]


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "runs"            # the run lives in <out_dir>/<name>
    seed: int = 0
    max_steps: int = 1000            # optimizer steps
    log_every: int = 10
    save_every: int = 500            # also saved on SIGTERM/SIGUSR1 and at the end
    keep_last: int = 3
    eval_every: int = 0              # 0: only at the end
    image_every: int = 0             # 0: only at the end
    collective_timeout_s: float = 600.0
    universal_timeout_s: float = 14400.0  # how long ranks wait for rank 0's world-size conversion
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    grad_clip: float = 2.0           # VAR's tclip
    activation_checkpointing: bool = False
    # block-causal attention kernel (models/kernels.py): key_prefix, dense_mask, or auto (measured at start)
    attention: Literal["auto", "key_prefix", "dense_mask"] = "key_prefix"
    num_threads: int = 0             # torch intra-op threads per rank; 0 keeps the launcher's setting
    # glibc malloc keeps freed memory: no page faults per step on CPU (host_memory); null: on for CPU runs only
    keep_freed_host_memory: Optional[bool] = None
    init_from: Optional[str] = None  # a previous stage's checkpoint dir (or an imported official one)
    # each rank writes the keys of the samples of every step it trains (with their epoch and aspect-ratio bucket)
    # to <run>/samples/rank_<r>.jsonl, to audit the data order: which samples a loss spike saw, none repeated
    log_samples: bool = False

    def __post_init__(self):
        for k in ("max_steps", "log_every", "keep_last", "grad_accum"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("save_every", "eval_every", "image_every", "num_threads"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.universal_timeout_s <= 0:
            raise ValueError(f"universal_timeout_s must be > 0, got {self.universal_timeout_s}")
        if self.dtype == "fp16":
            raise ValueError("dtype: fp16 is not supported (its loss scaling is untested here and HART trains in "
                             "bf16); use bf16 on GPUs with bf16 support (A100, H100, ...) or fp32")
        if "/" in self.name or self.name in ("", ".", ".."):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_steps and weight_decay must be >= 0, min_lr_ratio in [0, 1]")


@dataclass
class ZeroSection:
    stage: Optional[int] = None  # None: 3 for the t2i stage, 2 for the tokenizer stages
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = 5_000_000
    allgather_bucket_size: int = 5_000_000
    param_persistence_threshold: int = 0   # 0: every parameter is sharded under ZeRO-3
    # ZeRO-3 keeps at most this many gathered parameter elements, and keeps one gathered when it is used
    # again within this many elements of fetches (DeepSpeed's defaults; `hart-train plan` counts the first)
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000

    def __post_init__(self):
        if self.stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {self.stage}")


@dataclass
class EmaSection:
    enabled: bool = True
    decay: float = 0.9999

    def __post_init__(self):
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")


@dataclass
class WandbSection:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "hart-train"


@dataclass
class TokenizerStageConfig:
    """The `tokenizer-vq` and `tokenizer-hybrid` stages.

    tokenizer-vq trains everything on the discrete-only path (the decoder always sees f_hat, as VAR's
    VQVAE). tokenizer-hybrid freezes encoder, quant_conv and the quantizer (HART AE:113-122) and trains the
    decoder on the discrete-only f_hat with probability `model.skip_continuous_prob`, else on the
    continuous latent (paper: 50/50). Its `run.init_from` is the tokenizer-vq checkpoint.
    """

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    eval_url: Optional[str] = None   # held-out dataset for PSNR/SSIM; None: no held-out evaluation
    eval_samples: int = 64
    num_image_samples: int = 8       # images in the logged reconstruction grid

    def __post_init__(self):
        if self.eval_samples < 1 or self.num_image_samples < 1:
            raise ValueError("eval_samples and num_image_samples must be >= 1")


def _default_prompts() -> list[str]:
    return ["red apple", "smiling face with sunglasses", "rocket", "grinning cat", "blue heart", "palm tree"]


@dataclass
class T2IStageConfig:
    """The text-to-image stages: `HARTForT2I` trained with ZeRO-3, tokenizer and text encoder frozen.

    `model` is HART's config; its quirks (randn text drop, 0.25/sqrt(d) attention scale, the reused
    last-stage CFG ratio) default to the released behaviour, see `hart_train.models.HARTConfig`.
    """

    model: HARTConfig = field(default_factory=HARTConfig)
    tokenizer_ckpt: str = ""                 # a tokenizer-hybrid (or -vq) checkpoint directory
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    head_only: bool = False                  # train only the diffusion head (diffloss.*)
    # LoRA adapters on a frozen base (run.init_from): {rank, alpha, dropout, targets: [attention, mlp, adaln,
    # diffusion_head]} (hart_train.lora); null: the weights themselves train
    lora: Optional[LoraSection] = None
    sample_prompts: list[str] = field(default_factory=_default_prompts)
    sample_cfg: float = 4.5
    sample_top_k: int = 600
    sample_seed: int = 0
    # held-out set: image shards (token shards with data.kind: tokens, encoded like data.urls); None: none.
    # Its first `eval_samples` samples are evaluated at every run.eval_every steps and at the end.
    eval_url: Optional[str] = None
    eval_samples: int = 64
    # aspect-ratio buckets the model trains and samples on, last-scale token grids height x width ("56x72");
    # null: the default set of the resolution (hart_train.models.buckets: 9 buckets at 256/512/1024 px, the
    # square one alone for other schedules). A bucketed dataset's buckets must all be in it.
    buckets: Optional[list[str]] = None

    def __post_init__(self):
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1, got {self.eval_samples}")
        try:
            stage_buckets(self.buckets, self.model.patch_nums)
        except ValueError as e:
            raise ValueError(f"buckets: {e}") from None
        if self.lora is not None and self.head_only:
            raise ValueError("lora and head_only exclude each other: LoRA freezes every weight and trains adapters; "
                             "for adapters on the diffusion head set lora.targets: [diffusion_head]")
        if self.model.context_token != self.text_encoder.max_length:
            raise ValueError(f"model.context_token ({self.model.context_token}) must equal "
                             f"text_encoder.max_length ({self.text_encoder.max_length})")


@dataclass
class RunConfig:
    stage: StageName = "tokenizer-vq"
    run: RunSection = field(default_factory=RunSection)
    data: ReaderConfig = field(default_factory=ReaderConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    ema: EmaSection = field(default_factory=EmaSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    tokenizer: TokenizerStageConfig = field(default_factory=TokenizerStageConfig)
    t2i: T2IStageConfig = field(default_factory=T2IStageConfig)

    def __post_init__(self):
        if self.run.activation_checkpointing and self.stage != "t2i":
            raise ValueError(f"run.activation_checkpointing: the {self.stage} stage does not checkpoint activations "
                             "(only the t2i transformer does); set it false")
        if self.run.attention != "key_prefix" and self.stage != "t2i":
            raise ValueError(f"run.attention: the {self.stage} stage has no block-causal attention; leave it key_prefix")
        if self.t2i.lora is not None and self.stage != "t2i":
            raise ValueError(f"t2i.lora: LoRA adapts the t2i transformer; the {self.stage} stage has none; set it null")
        if self.zero.stage is None:
            self.zero.stage = 3 if self.stage == "t2i" else 2
        if self.zero.stage == 3 and self.stage != "t2i":
            raise ValueError(f"zero.stage: the {self.stage} stage trains under ZeRO stages 0-2 (its quantizer's outputs "
                             "are not visible to ZeRO-3's parameter hooks, and its ~100M parameters need no "
                             "partitioning); use 2")
