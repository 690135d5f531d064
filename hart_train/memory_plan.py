"""Memory planner for a t2i run: what one rank needs, before anything is allocated (`hart-train plan`).

Per rank, by holder:
- model states, counted exactly from the model's parameter list built on the meta device, for the
  config's ZeRO stage, world size, dtype and offload settings (DeepSpeed 0.19 layouts):
  * ZeRO-3: each parameter split into ceil(numel / N) elements per rank, in the run dtype, plus the full
    tensor of every parameter under `zero.param_persistence_threshold` elements (kept gathered); the fp32
    master copy of the trainable partitions (in fp32 runs the partitions themselves), the flat gradient
    partition (run dtype) and Adam's two fp32 moments;
  * ZeRO-1/2: the whole model in the run dtype, fp32 masters / moments (and at stage 2 gradients)
    partitioned; ZeRO-0: everything whole;
  * `zero.offload_optimizer` moves masters, gradients and moments to host memory, `zero.offload_param`
    the parameter partitions;
  * only trainable parameters have masters, gradients, moments and EMA: with `t2i.lora` the adapters (the
    model is built with them, as the stage builds it), the frozen base counting as parameters only;
- the EMA (fp32, the same partition as the masters), the frozen tokenizer (fp32, whole) and, when the run
  reads images, the frozen text encoder (its config's dtype, whole);
- ZeRO-3's gradient reduce bucket (`zero.reduce_bucket_size` elements in the run dtype, allocated whole
  when the engine starts);
- the step's peak above those, the largest of its phases (`Planner.step_transient`): forward and
  backward (activations, ZeRO-3's gathered parameters) and the optimizer step (its fp32 gradient copy
  and temporaries, 12 bytes per partition element in bf16, calibrated by measurement). Activations and temporaries are *traced*, not estimated: the
  stage's own code (tokenizer encode and text encoder when the data are images, then the transformer's
  forward and backward with the config's dtype, activation checkpointing and attention) runs on fake
  tensors (`torch._subclasses.FakeTensorMode`, CPU kernels' shapes, no data), and a dispatch mode adds up
  the bytes of every live storage; the peak over the step is the activation figure. Gradients are
  dropped as soon as they are accumulated (ZeRO reduces them into its buckets). The last scale keeps the
  *most* tokens HART's dropping can keep (memory must fit every step; FLOPs use the expectation);
- the step is traced on the run's largest aspect-ratio bucket (`t2i.buckets`, models/buckets.py: the most
  tokens over all scales, e.g. 52x80 of the 1024px default set), the longest sequence any step runs; the
  square schedule when that is the square bucket, and with token shards (always square). A listed set whose largest bucket has fewer last-scale
  tokens than another also traces that one and plans the larger (`Planner._plan_bucket`). FLOPs per sample
  stay the square's, the model's nominal figure (the default buckets are within 2% of it); the notes name
  the planned bucket;

Attention is traced with the kernel `run.attention` names, or with each where `auto` chooses at start (the
larger wins). On fake CPU tensors SDPA takes the memory-efficient (flash) kernel's footprint, which is what
CUDA's flash / memory-efficient kernels keep too (the output and a log-sum-exp, not the score matrix).

The allowance for what the tally cannot see (CUDA context, NCCL and cuBLAS workspaces: OVERHEAD_BYTES;
the caching allocator's fragmentation: FRAGMENTATION of the rest) is subtracted from `--gpu-mem`
before the largest micro-batch is searched. `tests/test_memory_plan.py` checks the total against the peak a real
2-rank run measures (`memory.json`'s `peak_total`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hart_train import flops as F_
from hart_train import lora
from hart_train.models import HARTConfig, HARTForT2I, kernels
from hart_train.models.buckets import (Bucket, Schedule, as_schedule, largest_bucket, num_tokens, stage_buckets,
                                       training_schedule)
from hart_train.models.hart_t2i import TrainDraws

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OVERHEAD_BYTES = 2 * GiB  # CUDA context (~0.5 GiB), NCCL communicators and buffers, cuBLAS workspaces
FRAGMENTATION = 0.10  # share of what remains lost to the caching allocator's fragmentation

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's datasheets; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
GPU_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.05}

# Qwen2-VL-1.5B-Instruct's language model (HART's text encoder), from its published config.json; used when
# the config's text encoder directory is not on this machine (the planner says so).
QWEN2_VL_1_5B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                          rms_norm_eps=1e-6, tie_word_embeddings=True)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by (part of) its name, e.g. torch.cuda.get_device_name(); None if unknown."""
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return tflops
    return None


# ----------------------------------------------------------------------------- tracing


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while active, and their peak per phase. Storages that exist before
    (`ignore`) are not counted; a storage is forgotten when its last tensor dies."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live = 0
        self.phase_peak = 0  # the peak since the last `new_phase()`
        self._refs: dict[int, weakref.ref] = {}
        for t in ignore:
            st = t.untyped_storage()
            self._refs[id(st)] = weakref.ref(st)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs and self._refs[key]() is st:
            return
        n = st.nbytes()
        self.live += n
        self.phase_peak = max(self.phase_peak, self.live)

        def release(_, key=key, n=n):
            self.live -= n
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(st, release)

    def new_phase(self) -> int:
        """Start a new phase; returns the peak of the one that ends."""
        peak, self.phase_peak = self.phase_peak, self.live
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _fake(build, fake_mode) -> nn.Module:
    """`build()` on the meta device, then given fake CPU storage (no data is ever allocated)."""
    with torch.device("meta"):
        module = build()
    with fake_mode:
        module.to_empty(device="cpu")
    return module


def max_kept_last(cfg: HARTConfig, schedule: Schedule | None = None) -> int:
    """The most last-scale tokens HART's dropping keeps in a step (the mask rate at its minimum), among the
    h*w of `schedule`'s last scale (None: the square patch_nums[-1]^2)."""
    H, W = as_schedule(cfg.patch_nums if schedule is None else schedule)[-1]
    n = H * W
    return n - len(range(n)[: min(math.ceil(n * cfg.mask_ratio_min), n - cfg.last_scale_min_keep)])


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    world_size: int
    micro_batch: int
    device: dict  # holder -> bytes on the GPU (or this rank's device)
    host: dict  # holder -> bytes in host memory (offload)
    step_phases: dict  # phase -> bytes above the held states; device["step_peak"] is the largest
    notes: list
    flops_per_sample: float  # model FLOPs of one training sample (forward + backward, flops.py)
    hardware_flops_per_sample: float  # with checkpointing's recompute

    @property
    def total(self) -> int:
        return sum(self.device.values())

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "micro_batch": self.micro_batch, "device_bytes": self.device,
                "device_total_bytes": self.total, "host_bytes": self.host,
                "step_phases_bytes": self.step_phases, "notes": self.notes,
                "train_flops_per_sample": self.flops_per_sample,
                "hardware_flops_per_sample": self.hardware_flops_per_sample}


class Planner:
    """Plans one t2i RunConfig. The model-state terms do not depend on the micro-batch; `plan(b)` traces
    the step at micro-batch b (a few seconds per trace at full size; a search takes about a minute)."""

    def __init__(self, cfg, world_size: int):
        if cfg.stage != "t2i":
            raise ValueError(f"hart-train plan covers the t2i stage; this config's stage is {cfg.stage!r}")
        if world_size < 1:
            raise ValueError(f"--gpus must be at least 1, got {world_size}")
        self.cfg, self.N = cfg, world_size
        self.model_cfg: HARTConfig = cfg.t2i.model
        self.dtype = cfg.run.dtype
        self.notes: list[str] = []
        self._plan_bucket()
        with torch.device("meta"):
            model = self._build_model()
        self.params = [(n, p.numel(), p.requires_grad) for n, p in model.named_parameters()]
        self.tok_cfg = self._tokenizer_config()
        self.text_cfg = self._text_config() if cfg.data.kind == "images" else None
        self._states = self._model_states()
        self._plans: dict[int, Plan] = {}

    # -- what is built

    def _plan_bucket(self) -> None:
        """The buckets the step is traced on (`self.traced`: (bucket, schedule), None for the square bucket,
        which traces exactly the square schedule): the largest of the stage's (`self.bucket`, the most tokens),
        and any other bucket no bucket outgrows in both the tokens before the last scale and the last scale's
        (memory goes with both, the kept last-scale tokens running the diffusion head `diffusion_batch_mul`
        times, so a set like 4x4, 3x5 at S = 4 needs the square traced too: 3x5 has 22 tokens to 21, 15 of
        them at the last scale to 16). Every default set's largest bucket has the most of both: one trace."""
        pn = tuple(self.model_cfg.patch_nums)
        # token shards are square (`hart-data encode` refuses a bucketed dataset)
        buckets = (Bucket(pn[-1], pn[-1]),) if self.cfg.data.kind == "tokens" else stage_buckets(self.cfg.t2i.buckets, pn)
        self.bucket = largest_bucket(buckets, pn)

        def size(b):
            last = b.height * b.width
            return num_tokens(b.schedule(pn)) - last, last

        sizes = {b: size(b) for b in buckets}
        traced: list = []
        for b in (self.bucket, *buckets):
            s = sizes[b]
            outgrown = any(o[0] >= s[0] and o[1] >= s[1] and o != s for o in sizes.values())
            if not outgrown and all(sizes[t] != s for t in traced):
                traced.append(b)
        self.traced = [(b, training_schedule(b, pn)) for b in traced]
        self._bucket_of_plan: dict[int, Bucket] = {}
        self._num_buckets, self._tokens = len(buckets), {b: sum(sizes[b]) for b in buckets}
        self._square_tokens = num_tokens(pn)

    def _build_model(self) -> HARTForT2I:
        model = HARTForT2I(self.model_cfg)
        if self.cfg.t2i.head_only:
            model.requires_grad_(False)
            model.diffloss.requires_grad_(True)
        if self.cfg.t2i.lora is not None:  # the adapters alone train: masters, gradients and moments are theirs
            lora.inject(model, self.cfg.t2i.lora)
        model.to(DTYPES[self.dtype])
        if self.cfg.run.activation_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def _tokenizer_config(self):
        from data_tools.encode import tokenizer_checkpoint_config
        from tokenizer.autoencoder import TokenizerConfig

        try:
            tok = tokenizer_checkpoint_config(self.cfg.t2i.tokenizer_ckpt)
        except FileNotFoundError:
            tok = TokenizerConfig(patch_nums=tuple(self.model_cfg.patch_nums))
            if tok.image_size != self.cfg.data.resolution:
                raise FileNotFoundError(f"tokenizer checkpoint {self.cfg.t2i.tokenizer_ckpt} not found, and the released "
                                        f"tokenizer's shape ({tok.image_size}px at these patch_nums) does not fit "
                                        f"data.resolution {self.cfg.data.resolution}: set t2i.tokenizer_ckpt")
            self.notes.append(f"tokenizer checkpoint {self.cfg.t2i.tokenizer_ckpt} not found: counted as the "
                              "released HART tokenizer's shape (TokenizerConfig defaults)")
        return dataclasses.replace(tok, patch_nums=tuple(self.model_cfg.patch_nums))

    def _text_config(self):
        import transformers

        te = self.cfg.t2i.text_encoder
        path = Path(te.path) if te.path else None
        if te.kind == "minilm" and not te.path:
            from data_tools.text_encoder import minilm_dir

            path = minilm_dir()
        if path is not None and (path / "config.json").is_file():
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            config = getattr(config, "text_config", None) or config  # Qwen2-VL: the language model
        else:
            config = transformers.Qwen2Config(**QWEN2_VL_1_5B_TEXT)
            self.notes.append(f"text encoder {te.path or te.kind} not found: counted as Qwen2-VL-1.5B-Instruct's "
                              "language model (its published config)")
        return config

    def _build_text_encoder(self):
        import transformers

        config = self.text_cfg
        if config.model_type in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text"):
            return transformers.Qwen2Model(transformers.Qwen2Config(**{
                k: getattr(config, k) for k in QWEN2_VL_1_5B_TEXT if hasattr(config, k)}))
        if config.model_type in ("t5", "mt5", "umt5"):
            return transformers.T5EncoderModel(config)
        return transformers.AutoModel.from_config(config)

    # -- model states

    def _model_states(self) -> tuple[dict, dict]:
        z, N, pb = self.cfg.zero, self.N, DTYPE_BYTES[self.dtype]
        total = sum(n for _, n, _ in self.params)
        trainable = sum(n for _, n, t in self.params if t)
        part = lambda n: -(-n // N)  # noqa: E731  ceil(n / N), DeepSpeed pads each partition
        if z.stage == 3:
            params = sum(part(n) for _, n, _ in self.params) * pb
            params += sum(n for _, n, _ in self.params if n < z.param_persistence_threshold) * pb
            shard = sum(part(n) for _, n, t in self.params if t)
        else:
            params = total * pb
            shard = part(trainable) if z.stage >= 1 else trainable
        # fp32 masters: a separate copy, except where they would equal the parameters: ZeRO-3 in fp32 steps
        # its fp32 partitions in place (unless offloaded), and ZeRO-0 in fp32 steps the parameters themselves
        in_place = self.dtype == "fp32" and (z.stage == 0 or (z.stage == 3 and not z.offload_optimizer))
        masters = 0 if in_place else shard * 4
        # ZeRO-3 keeps its flat gradient partition in the parameters' dtype (fp32 per sub-group at the step)
        grads = shard * pb if z.stage == 3 else (shard if z.stage == 2 else trainable) * 4
        moments = 2 * 4 * shard
        device = {"parameters": params, "master_weights": masters, "gradients": grads, "optimizer_state": moments}
        host = {}
        if z.offload_optimizer:
            for k in ("master_weights", "gradients", "optimizer_state"):
                host[k] = device.pop(k)
        if z.offload_param and z.stage == 3:
            host["parameters"] = device.pop("parameters")
        device["ema"] = 4 * shard if self.cfg.ema.enabled else 0
        self.trainable = trainable
        tok_numel = self._numel(self._tokenizer)
        device["frozen_tokenizer"] = tok_numel * 4
        if self.text_cfg is not None:
            te_bytes = DTYPE_BYTES.get(self.cfg.t2i.text_encoder.dtype, 2)
            device["frozen_text_encoder"] = self._numel(self._build_text_encoder) * te_bytes
        if z.stage == 3:  # DeepSpeed allocates its reduce bucket whole when the engine starts
            device["zero3_reduce_bucket"] = z.reduce_bucket_size * pb
        self.shard, self.optimizer_on_device = shard, not z.offload_optimizer
        self.step_bytes = 8 + (4 if self.dtype != "fp32" else 0)
        return device, host

    def step_transient(self, fwd_peak: int, bwd_peak: int) -> dict:
        """The step's memory above the held states, by phase; the step's peak is the largest phase.
        - forward / backward: the traced activations, plus under ZeRO-3 the gathered parameters (up to
          `zero.max_live_parameters` elements in the run dtype);
        - optimizer step: the gathered parameters are still held (measured: parameters used last in the
          backward are used first in the next forward, within `zero.max_reuse_distance`, so DeepSpeed
          keeps them), and, with the optimizer on the device, 12 bytes per element of the partition in bf16
          runs: the fp32 copy of the gradient partition DeepSpeed hands the optimizer, torch's multi-tensor
          AdamW's sqrt(v) temporary, and one more fp32 partition-sized temporary of the step (measured:
          `tests/test_memory_plan.py`'s model-states shape peaks 162-171 MiB above its holders where
          gathered parameters + 8 bytes per element would give 125 MiB). fp32 runs skip the copy (8 bytes;
          not measured)."""
        z, pb = self.cfg.zero, DTYPE_BYTES[self.dtype]
        gathered = 0
        if z.stage == 3:
            gathered = min(sum(n for _, n, _ in self.params if n >= z.param_persistence_threshold),
                           z.max_live_parameters + z.reduce_bucket_size) * pb
        return {"forward": gathered + fwd_peak, "backward": gathered + bwd_peak,
                "optimizer_step": gathered + (self.step_bytes * self.shard if self.optimizer_on_device else 0)}

    def _tokenizer(self):
        from tokenizer.autoencoder import HARTAutoEncoder

        return HARTAutoEncoder(self.tok_cfg)

    @staticmethod
    def _numel(build) -> int:
        with torch.device("meta"):
            module = build()
        return sum(t.numel() for t in (*module.parameters(), *module.buffers()))

    # -- activations

    def _fake_modules(self):
        """(fake mode, model, tokenizer, text encoder) on fake tensors, built once per planner."""
        if getattr(self, "_fakes", None) is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            fm = FakeTensorMode(allow_non_fake_inputs=True)
            model = _fake(self._build_model, fm).train()
            for p in model.parameters():  # ZeRO takes each gradient into its buckets as soon as it is complete
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
            tok = _fake(self._tokenizer, fm).eval() if self.text_cfg is not None else None
            text = _fake(self._build_text_encoder, fm).eval() if self.text_cfg is not None else None
            self._fakes = (fm, model, tok, text)
        return self._fakes

    def attention_kernels(self) -> list[str]:
        """The attention kernels the run may use: its `run.attention`, or both where `auto` picks at start."""
        return sorted(kernels.ATTENTION) if self.cfg.run.attention == "auto" else [self.cfg.run.attention]

    def activation_bytes(self, b: int) -> tuple[int, int]:
        """Peak bytes of one step's transient tensors at micro-batch b (see the module docstring), in the
        forward (with the tokenizer and text encoder before it) and in the backward; the largest over the
        attention kernels the run may use and the buckets traced (`self.traced`; the one with the highest
        peak is the plan's bucket)."""
        saved = kernels.active_attention()
        peaks: dict = {}  # bucket -> (forward, backward), the larger over the kernels
        try:
            for name in self.attention_kernels():
                kernels.set_attention(name)
                for bucket, schedule in self.traced:
                    kernels.clear_caches()  # a cached mask of another shape would not be counted
                    f, w = self._trace(b, schedule)
                    f0, w0 = peaks.get(bucket, (0, 0))
                    peaks[bucket] = max(f0, f), max(w0, w)
        finally:
            kernels.set_attention(saved)
        self._bucket_of_plan[b] = max(peaks, key=lambda k: max(peaks[k]))  # ties: the earlier (the largest)
        return max(p[0] for p in peaks.values()), max(p[1] for p in peaks.values())

    def _trace(self, b: int, schedule: Schedule | None = None) -> tuple[int, int]:
        fm, model, tok, text = self._fake_modules()
        mc = self.model_cfg
        grids = as_schedule(mc.patch_nums if schedule is None else schedule)
        (H, W), T = grids[-1], mc.context_token
        kept, n_last, L = max_kept_last(mc, schedule), H * W, sum(h * w for h, w in grids)
        frozen = [t for m in (model, tok, text) if m is not None for t in (*m.parameters(), *m.buffers())]
        with fm, LiveBytes(ignore=frozen) as live:
            mask = torch.ones(b, T, dtype=torch.long)
            pos = torch.arange(T).expand(b, T).contiguous()
            if tok is not None:
                res = self.cfg.data.resolution
                ds = self.tok_cfg.downsample
                hw = (res, res) if schedule is None else (ds * H, ds * W)
                with torch.no_grad():
                    idx_Bl, f_rest = tok.img_to_idxBl_and_frest(torch.zeros(b, 3, *hw), patch_nums=schedule)
                    context = text(input_ids=torch.zeros(b, T, dtype=torch.long),
                                   attention_mask=mask).last_hidden_state.float()
                x_in = tok.idxBl_to_var_input(idx_Bl, patch_nums=schedule)
                codebook = tok.quantize.codebook()
            else:
                idx_Bl = list(torch.zeros(b, L, dtype=torch.long).split([h * w for h, w in grids], dim=1))
                f_rest = torch.zeros(b, n_last, mc.Cvae)
                context = torch.zeros(b, T, mc.context_dim)
                x_in = torch.zeros(b, L - 1, mc.Cvae)
                codebook = torch.zeros(mc.vocab_size, mc.Cvae)
            mul = mc.diffusion_batch_mul
            dp = torch.ones(mc.depth, 2, b) if mc.drop_path_rate > 0 else None
            draws = TrainDraws(torch.arange(n_last - kept, n_last).expand(b, kept).contiguous(),
                               torch.zeros(b, dtype=torch.bool), dp, torch.zeros(b, kept, dtype=torch.long),
                               torch.zeros(mul * b * kept, dtype=torch.long), torch.zeros(mul * b * kept, mc.Cvae))
            out = model(context, mask, x_in, idx_Bl, f_rest, codebook, context_position_ids=pos, draws=draws,
                        schedule=schedule)
            forward = live.new_phase()
            out["loss"].backward()
        return forward, live.new_phase()

    # -- results

    def plan(self, micro_batch: int) -> Plan:
        if micro_batch in self._plans:
            return self._plans[micro_batch]
        self._plans[micro_batch] = plan = self._plan(micro_batch)
        return plan

    def _plan(self, micro_batch: int) -> Plan:
        device, host = dict(self._states[0]), dict(self._states[1])
        phases = self.step_transient(*self.activation_bytes(micro_batch))
        device["step_peak"] = max(phases.values())
        notes = list(self.notes)
        if self._num_buckets > 1 or self.traced[0][1] is not None:  # not the square bucket alone
            bucket, big, n = self._bucket_of_plan[micro_batch], self.bucket, self._num_buckets
            if bucket == big:
                what = (f"the largest of {n}" if n > 1 else "the only one") + \
                    f": {self._tokens[bucket]} tokens vs the square's {self._square_tokens}"
            else:
                what = (f"{self._tokens[bucket]} tokens, {bucket.height * bucket.width} at the last scale: the most "
                        f"memory of {', '.join(str(t) for t, _ in self.traced)}, traced of {n}; the largest, {big}, "
                        f"has {self._tokens[big]} tokens, {big.height * big.width} at the last scale")
            notes.append(f"memory planned for bucket {bucket} ({what}); FLOPs per sample are the square's")
        f = F_.sample_flops(self.model_cfg)
        return Plan(self.N, micro_batch, device, host, phases, notes, f.train_step_flops,
                    f.hardware_flops(self.cfg.run.activation_checkpointing))

    @staticmethod
    def usable(gpu_mem_bytes: float) -> float:
        return (gpu_mem_bytes - OVERHEAD_BYTES) * (1 - FRAGMENTATION)

    def largest_micro_batch(self, gpu_mem_bytes: float, limit: int = 4096) -> tuple[int, Plan | None]:
        """The largest micro-batch (up to `limit`) whose plan fits `usable(gpu_mem_bytes)`; (0, None) if not
        even 1 does. Activations grow about linearly in b: the linear guess from b = 1, 2 brackets the
        answer, which traced plans then confirm (a few traces when the guess is right, a bisection if not)."""
        budget = self.usable(gpu_mem_bytes)
        fits: dict[int, Plan] = {}

        def ok(b: int) -> bool:
            plan = self.plan(b)
            if plan.total <= budget:
                fits[b] = plan
                return True
            return False

        if not ok(1):
            return 0, None
        per_sample = max(self.plan(2).total - fits[1].total, 1)
        guess = max(1, min(limit, int((budget - fits[1].total) // per_sample) + 1))
        if ok(guess):  # then gallop upwards: guess + 1, + 2, + 4 ... until one does not fit
            lo, step = guess, 1
            while lo < limit and ok(min(limit, lo + step)):
                lo, step = min(limit, lo + step), 2 * step
            hi = min(limit, lo + step) if lo < limit else lo + 1
        else:
            lo, hi = 1, guess
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo, fits[lo]


def format_plan(plan: Plan, gpu_mem: float | None, best: tuple[int, Plan | None] | None,
                gpu: str | None, mfu: float, dtype: str) -> str:
    """The human-readable report of `hart-train plan`."""
    g = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"per rank, {plan.world_size} ranks, micro-batch {plan.micro_batch}, {dtype}:"]
    for k, v in plan.device.items():
        lines.append(f"  {k:28s}{g(v)}")
        if k == "step_peak":
            lines += [f"    {p:26s}{g(b)}" for p, b in plan.step_phases.items()]
    lines.append(f"  {'total':28s}{g(plan.total)}")
    for k, v in plan.host.items():
        lines.append(f"  host: {k:22s}{g(v)}")
    if gpu_mem is not None:
        lines.append(f"allowance: {OVERHEAD_BYTES / GiB:.1f} GiB (CUDA context, NCCL, cuBLAS) and {FRAGMENTATION:.0%} "
                     f"of the rest (fragmentation): {Planner.usable(gpu_mem) / GiB:.2f} of {gpu_mem / GiB:.0f} GiB usable")
        b, best_plan = best
        lines.append(f"largest micro-batch that fits: {b}" + (f" (total {g(best_plan.total).strip()})" if b else
                                                              " (the model states alone do not fit)"))
    lines.append(f"train FLOPs per sample: {plan.flops_per_sample / 1e12:.2f} TFLOP (model, fwd+bwd); "
                 f"{plan.hardware_flops_per_sample / 1e12:.2f} TFLOP executed with checkpointing")
    tflops = peak_tflops(gpu) if gpu else None
    if tflops:
        b = best[0] if best and best[0] else plan.micro_batch
        t = b * plan.flops_per_sample / (tflops * 1e12 * mfu)
        lines.append(f"on {gpu} ({tflops:.0f} TFLOP/s bf16 dense) at {mfu:.0%} MFU: {t:.2f} s per step of "
                     f"micro-batch {b}, {b * plan.world_size / t:.2f} samples/s over {plan.world_size} GPUs")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_json(plan: Plan, gpu_mem: float | None, best, gpu: str | None, mfu: float) -> str:
    out = plan.to_dict()
    if gpu_mem is not None:
        out.update(gpu_mem_bytes=gpu_mem, usable_bytes=Planner.usable(gpu_mem), largest_micro_batch=best[0],
                   overhead_bytes=OVERHEAD_BYTES, fragmentation=FRAGMENTATION)
    tflops = peak_tflops(gpu) if gpu else None
    if tflops:
        b = best[0] if best and best[0] else plan.micro_batch
        out.update(gpu=gpu, peak_tflops=tflops, assumed_mfu=mfu,
                   step_time_s=b * plan.flops_per_sample / (tflops * 1e12 * mfu))
    return json.dumps(out, indent=1)
