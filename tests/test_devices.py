"""Every stage keeps what it allocates on the device it is given, checked without a GPU.

The stand-in: the stage is given the `meta` device as its rank's device, while its config says
`run.device: cuda` (a stage that took its device from the config, or from a default, would reach for
CUDA, which this CPU build of torch lacks) and the reader's batches arrive on the CPU, as on a GPU node.
`DeviceAudit` fails every op that mixes devices (a host batch fed to the model, a host accumulator added
to device results), and stands in for the device -> host copies (`.cpu()`, `.item()`) that meta tensors
cannot make (and for `bincount`, which has no meta kernel), so the stage's code runs to its end; `.numpy()` on a device tensor fails on meta as on CUDA.
This is the class of bug where, on an 8-GPU node, rank 3's tokenizer lands on cuda:0 or an evaluation
all-reduces a CPU tensor over NCCL.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hart_train import config as C
from hart_train.run_config import RunConfig
from hart_train.stages import make_stage
from procs import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")
aten = torch.ops.aten
META = torch.device("meta")
TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default}


class DeviceAudit(TorchDispatchMode):
    """Fail any op whose tensors sit on more than one device (0-dim CPU scalars read by a device op
    excepted, as CUDA allows them)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is aten._local_scalar_dense.default and args[0].device == META:
            return 0.0 if args[0].dtype.is_floating_point else 0  # stand-in for a device -> host read
        if func is aten._to_copy.default and args[0].device == META and kwargs.get("device", META) != META:
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)  # device -> host copy
        if func is aten.bincount.default and args[0].device == META:  # no meta kernel: its size is data's
            return torch.zeros(args[2], dtype=torch.int64, device=META)
        # a 0-dim CPU tensor may enter a device op as a scalar, but an op cannot write into one from the device
        written = args[0] if func._schema.name.endswith("_") and tensors else None
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0 and t is not written)}
        if len(devices) > 1 and func not in TRANSFERS:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def _on(module: torch.nn.Module, device: torch.device) -> bool:
    return all(t.device == device for t in list(module.parameters()) + list(module.buffers()))


def _run_stage(cfg: RunConfig) -> dict:
    """What the trainer does with a stage, on the stand-in device: build, prepare, step hooks, eval, images."""
    with DeviceAudit():
        stage = make_stage(cfg, META)
        model = stage.build_model().to(META)  # DeepSpeed moves the module to the rank's device
        batch = next(iter(stage.make_reader(rank=0, world_size=1)))
        out = model(**stage.prepare(batch, step=7))
        out["loss"].backward()
        stage.after_step(model, out, 7)
        return {"stage": stage, "eval": stage.evaluate(model, None, 7), "images": stage.images(model, None, 7)}


def test_the_audit_catches_a_host_tensor_fed_to_a_device_model():
    layer = torch.nn.Linear(4, 4).to(META)
    with DeviceAudit(), pytest.raises(AssertionError, match="mixes devices"):
        layer(torch.zeros(2, 4))
    with DeviceAudit(), pytest.raises(AssertionError, match="mixes devices"):
        torch.zeros(3, dtype=torch.float64).add_(layer.weight.sum(0)[:3])


def test_tokenizer_stage_keeps_everything_on_its_device(emoji_dataset):
    cfg = C.load(RunConfig, str(REPO / "configs/tokenizer_vq_tiny.yaml"), [
        f"data.urls=[{emoji_dataset}]", f"tokenizer.eval_url={emoji_dataset}", "tokenizer.eval_samples=8",
        "data.num_workers=0", "run.device=cuda", "tokenizer.loss.disc_start_step=0",
        "tokenizer.loss.dead_code_steps=1"])
    got = _run_stage(cfg)
    assert set(got["eval"]) == {"eval/psnr_discrete", "eval/ssim_discrete", "eval/psnr_continuous", "eval/ssim_continuous"}
    assert got["images"]["reconstruction"].dtype.name == "uint8"


def test_t2i_stage_keeps_everything_on_its_device(emoji_dataset, tokenizer_ckpt):
    cfg = C.load(RunConfig, str(REPO / "configs/t2i_tiny.yaml"), [
        f"data.urls=[{emoji_dataset}]", f"t2i.tokenizer_ckpt={tokenizer_ckpt}", "t2i.model.vocab_size=64",
        "t2i.model.Cvae=8", "data.num_workers=0", "run.device=cuda", "t2i.sample_prompts=[red apple]"])
    got = _run_stage(cfg)
    stage = got["stage"]
    assert _on(stage.tokenizer, META) and _on(stage.text_encoder.model, META)
    assert got["images"]["samples"].shape == (16, 16, 3)
