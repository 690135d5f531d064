"""LoRA fine-tuning of `HARTForT2I` (`t2i.lora`): low-rank adapters on chosen linear layers, the base
weights frozen. Built with peft; this module holds the schema, which layers the adapters go on, their
initial values, and the mapping between a model with adapters and the official weight layout.

Decisions:
- peft builds the adapters (`inject_adapter_in_model`): a LoRA layer around each targeted `nn.Linear`
  computing `base(x) + B(A(dropout(x))) * alpha / rank`, only the `lora_*` parameters trainable, and its
  `merge` (W + alpha / rank * B @ A). The model's own code is unchanged by it: every targeted layer is
  called as a module (the fused qkv projection too, `models.blocks.QKVProjection`), which is all a LoRA
  layer needs to see its input.
- Targets are named groups of linear layers (`TARGET_GROUPS`), each a regular expression over module names
  that matches only `nn.Linear` modules: `attention` (qkv_proj, proj), `mlp` (the SwiGLU's three),
  `adaln` (the blocks' and the head's AdaLN projections), `diffusion_head` (every linear of the MLP
  denoiser). The embeddings and the output head are not offered: LoRA on them is unusual, and full
  fine-tuning covers it.
- The adapters are injected where the model is built (`T2IStage.build_model`), so under ZeRO-3 they are
  created inside DeepSpeed's partitioned construction like every other layer: no rank ever holds a whole
  layer it does not own. peft's own initialisation would write into the partition placeholders, so it is
  switched off (`init_lora_weights=False`) and `init_adapters` sets the values: A uniform in
  +-1/sqrt(in_features) (peft's and nn.Linear's default, kaiming-uniform with a=sqrt(5)), B zero, so the
  adapted model starts exactly as the base. A is drawn in fp32 from a CPU generator seeded by `run.seed`
  and the layer's index: the same values on every rank, device and dtype (rounded to the run's dtype), and
  independent of the base model's own random initialisation.
- Names: a wrapped layer keeps its path and gains `.base_layer` (`blocks.0.attn.proj.base_layer.weight`);
  `base_name` maps that back to the official name, which is how `run.init_from` (a hart-train checkpoint or
  an imported official one) loads into the frozen base. The adapters are `<layer>.lora_A.default.weight`
  and `<layer>.lora_B.default.weight`, the names the optimizer, the EMA and DeepSpeed's checkpoints use.
- Checkpoints of a LoRA run hold the adapters only (model.safetensors, ema.safetensors, the optimizer's
  fp32 masters and moments); the base weights are `run.init_from`'s model.safetensors (the raw weights,
  what full fine-tuning starts from too; of an imported official checkpoint, its model.safetensors), read
  again at every start (a resume included) from the path in the run's config. `load_checkpoint_model`
  rebuilds the model from a LoRA checkpoint's config.yaml the same way, with the adapters merged or not.
  The base file's sha256 is in every checkpoint's meta.json (`lora_base_sha256`): a resume, `hart-sample`
  and `hart-train export` refuse a base changed in place (`check_base`), whose adapters would no longer fit.
- `dropout` is peft's nn.Dropout on the adapters' input: it draws from torch's global RNG, which the
  trainer checkpoints per rank (and activation checkpointing replays), not from the model's generator.
- peft (and the transformers it imports, about 3 s) is imported where adapters are built, not at module
  import: the config schema imports this module, and reading a config should not pay for it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn

from data_tools.token_format import file_sha256
from hart_train import config as C
from hart_train import zero_utils
from hart_train.models.official_layout import load_official_state_dict

ADAPTER = "default"  # peft's adapter name; one adapter per model
TARGET_GROUPS = {
    "attention": r"blocks\.\d+\.attn\.(?:qkv_proj|proj)",
    "mlp": r"blocks\.\d+\.ffn\.(?:gate_proj|up_proj|down_proj)",
    "adaln": r"blocks\.\d+\.ada_lin\.1|head_nm\.ada_lin\.1",
    "diffusion_head": r"diffloss\.net\.(?:time_embed\.mlp\.[02]|cond_embed|input_proj"
                      r"|res_blocks\.\d+\.(?:mlp\.[02]|adaLN_modulation\.1)|final_layer\.(?:linear|adaLN_modulation\.1))",
}
_ADAPTER_PARAM = re.compile(r"\.lora_[AB]\." + ADAPTER + r"\.weight$")


def _default_targets() -> list[str]:
    return ["attention", "mlp"]


@dataclass
class LoraSection:
    """`t2i.lora`: adapters of rank `rank` on the linear layers of the `targets` groups (TARGET_GROUPS),
    scaled by alpha / rank, with dropout on their input."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=_default_targets)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"targets must name at least one of {sorted(TARGET_GROUPS)}")
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        if unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: {self.targets} must be distinct names of {sorted(TARGET_GROUPS)}"
                             + (f" (unknown: {unknown})" if unknown else ""))


def target_pattern(targets: list[str]) -> str:
    """One regular expression that fully matches the module names of the `targets` groups."""
    return "(?:" + "|".join(TARGET_GROUPS[t] for t in targets) + ")"


def is_adapter(name: str) -> bool:
    return _ADAPTER_PARAM.search(name) is not None


def base_name(name: str) -> str:
    """The official name of a base parameter or buffer of a model with adapters."""
    return name.replace(".base_layer.", ".")


def inject(model: nn.Module, cfg: LoraSection) -> nn.Module:
    """Wrap the targeted linear layers of `model` (in place) with LoRA layers; afterwards only the adapters
    are trainable. Their values are set by `init_adapters`. Returns `model`."""
    from peft import LoraConfig, inject_adapter_in_model

    pattern = target_pattern(cfg.targets)
    for group in cfg.targets:  # every group names linear layers, and some
        names = [n for n, m in model.named_modules() if re.fullmatch(TARGET_GROUPS[group], n)]
        assert names and all(isinstance(model.get_submodule(n), nn.Linear) for n in names), (group, names)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern,
                          init_lora_weights=False, bias="none")
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable), trainable[:5]
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA layer, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A of layer i uniform in +-1/sqrt(in_features) from a CPU generator seeded by (seed, i), B zero. Works on
    a partitioned model (one layer gathered at a time; rank 0's values are kept, and every rank draws the
    same ones anyway)."""
    for i, (_, layer) in enumerate(lora_layers(model)):
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        shape = tuple(getattr(A, "ds_shape", A.shape))
        g = torch.Generator().manual_seed(_layer_seed(seed, i))
        bound = 1.0 / math.sqrt(shape[1])
        values = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)
        with zero_utils.modifying([A, B]):
            A.copy_(values.to(A.device))
            B.zero_()


def _layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + 0x10AA * (index + 1)) % 2**63


def base_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base of a model with adapters by official name: every non-adapter parameter and persistent
    buffer, what `zero_utils.load_safetensors` loads `run.init_from` into."""
    out = {base_name(n): p for n, p in model.named_parameters() if not is_adapter(n)}
    out.update((base_name(n), b) for n, b in model.named_buffers() if zero_utils.is_persistent(model, n))
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters by name (unpartitioned models only: sampling, export)."""
    return {n: p for n, p in model.named_parameters() if is_adapter(n)}


@torch.no_grad()
def load_adapters(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict: `state` holds exactly the model's adapters, with their shapes."""
    ours = adapter_state(model)
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if tuple(ours[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not match the LoRA adapters of the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    for k, p in ours.items():
        p.copy_(state[k])


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (peft's merge) and put the base layers back in place of the
    LoRA layers (in place): the official module and parameter names. Returns `model`."""
    for name, layer in lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer.get_base_layer())
    return model


# ---------------------------------------------------------------------- LoRA checkpoints
def lora_of(run: dict) -> LoraSection | None:
    """The LoRA section of a run's config.yaml (as loaded YAML), or None for a run without adapters."""
    section = (run.get("t2i") or {}).get("lora") if isinstance(run, dict) else None
    return None if section is None else C.build(LoraSection, section, "t2i.lora")


def base_dir(run: dict, where: str) -> str:
    """The directory of a LoRA run's base weights: its run.init_from."""
    path = ((run.get("run") or {}).get("init_from")) or ""
    if not path:
        raise ValueError(f"{where}: a LoRA run without run.init_from (its base weights)")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{where}: the base weights of this LoRA checkpoint, run.init_from={path}, have no "
                                "model.safetensors (the adapters need the checkpoint they were trained on)")
    return path


def base_sha256(base: str) -> str:
    """sha256 of a base directory's model.safetensors, computed once per process for an unchanged file
    (a start checks it in validate_paths and records it from load_init: one read of a multi-GB file)."""
    path = os.path.join(base, "model.safetensors")
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def check_base(trained_on: str | None, found: str | None, base: str) -> None:
    """A ValueError where the base weights at `base` (sha256 `found` of its model.safetensors) are not the ones
    the adapters were trained on (`trained_on`, from the checkpoint's meta.json; None in checkpoints written
    before it was recorded: not checked)."""
    if trained_on is not None and found != trained_on:
        raise ValueError(f"run.init_from: the base weights {base}/model.safetensors have changed since this LoRA "
                         f"checkpoint was written (sha256 {found}, trained on {trained_on}); its adapters belong to "
                         "that base: restore it, or start a new run")


def load_checkpoint_model(model: nn.Module, ckpt_dir: str, run: dict, use_ema: bool, merged: bool) -> nn.Module:
    """`model` (a fresh HARTForT2I of the checkpoint's config, on the CPU) with a LoRA checkpoint's weights:
    the base from run.init_from, the adapters from ema.safetensors (`use_ema`) or model.safetensors, merged
    into the base or left as adapters. Returns the model (the same object; its layers replaced if merged)."""
    cfg_path = os.path.join(ckpt_dir, "config.yaml")
    base = base_dir(run, cfg_path)
    meta = os.path.join(ckpt_dir, "meta.json")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            trained_on = json.load(f).get("lora_base_sha256")
        check_base(trained_on, base_sha256(base), base)
    load_official_state_dict(model, load_file(os.path.join(base, "model.safetensors")), strict=True)
    inject(model, lora_of(run))
    name = "ema.safetensors" if use_ema else "model.safetensors"
    if not os.path.isfile(os.path.join(ckpt_dir, name)):
        raise FileNotFoundError(f"{ckpt_dir} has no {name}")
    load_adapters(model, load_file(os.path.join(ckpt_dir, name)), os.path.join(ckpt_dir, name))
    model.requires_grad_(False)
    return merge(model) if merged else model
