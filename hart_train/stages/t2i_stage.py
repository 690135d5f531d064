"""The text-to-image stages (`t2i`, configured per resolution: configs/t2i_*.yaml) on the shared runtime.

The DeepSpeed engine holds exactly `HARTForT2I` (its state dict is the official one), sharded with
ZeRO-3. The tokenizer and the text encoder are frozen and live beside the engine on every rank, in
eval mode: a batch of images and captions becomes the transformer's inputs on the fly (per-scale
indices, teacher-forcing input, last-scale residual, text embeddings). The next stage at a higher
resolution starts from this one's `model.safetensors` (`run.init_from`): 2D RoPE and the sinusoidal
level embedding make the weights independent of the schedule length.

With `data.kind: tokens` the batches are `hart-data encode` token shards (indices, last-scale
residual, text embeddings; `validate_paths` has checked they come from this run's tokenizer weights and
text encoder settings): `prepare` only splits the indices per scale and runs
`tokenizer.idxBl_to_var_input` (embedding lookups and interpolation; the tokenizer's encoder never
runs). The tokenizer is still loaded, for that codebook and for decoding sample grids. The text encoder
is then built lazily, the first time a sample grid needs the prompts encoded (never, with no
`sample_prompts`); with image data it is built up front, so a broken text encoder fails before step 1.

Aspect-ratio buckets (`t2i.buckets`, hart_train.models.buckets): a bucketed image dataset (`hart-data
shard --buckets`) gives micro-batches of one bucket each, the same bucket on every rank of a step
(data_tools.plan); `prepare` turns the batch's `bucket` ((width, height) px) into the bucket's schedule,
which the tokenizer and the model run on. The square bucket and unbucketed data run schedule None, the
square path computed exactly as without buckets. Token shards are square (`hart-data encode` refuses a
bucketed dataset). `validate_paths` has checked that every bucket of the data is in `t2i.buckets`.

`head_only` freezes everything but the diffusion head (`diffloss.*`): one config flag, no new code.
`lora` trains peft's low-rank adapters on a frozen base instead (hart_train.lora); its checkpoints hold
the adapters only, and the base is `run.init_from`'s, loaded at every start (`frozen_from_init`).
Sample grids during training use the raw (not EMA) weights; `hart-sample` uses the EMA weights.

Held-out evaluation (`t2i.eval_url`, `evaluate`): the per-scale cross-entropy and token accuracy, the
diffusion loss and their totals, named as the training log names them under `eval/` (raw weights) and
`eval_ema/` (EMA weights), averaged over every held-out token (CE, accuracy) and sample (diffusion):
sums and counts are all-reduced, not means of means. Decisions:
- The set is fixed: the first `t2i.eval_samples` samples of `eval_url` in the reader's order for seed 0 on
  one rank, read once per rank and cut into micro-batches of `data.batch_size`, each of one bucket
  (unbucketed: batch c holds samples c*B..c*B+B-1; `_read_held_out`), that go to the ranks round robin
  (c % world). A batch's numbers do not depend on which rank
  computes it, and the per-batch sums are added in batch order whatever the number of ranks, so the
  results are bit-identical on any number of ranks wherever one batch's forward is bit-reproducible (the
  same kernels and threads per rank; tests/test_t2i_eval.py checks 1 against 2 ranks). A rank left without
  a batch in the last round runs a spare one and drops it: ZeRO-3 gathers the weights collectively.
- The forward is the training forward with every draw given: all last-scale tokens kept (as the sampler
  runs the last scale, so CE and accuracy need no draw at all), no text dropped (the conditional model, the
  one CFG guides), no drop path, and the diffusion timesteps and noise of sample i drawn from (run.seed, i)
  alone. The last-scale token the diffusion residual is relative to is drawn as in training (the model's own
  top-k/top-p sample) from a generator seeded by (run.seed, the batch's first sample). None of it touches the
  training RNG streams, so a run with evaluation trains exactly as one without.
- The EMA weights are evaluated in place (`ema_weights`): each rank writes its own EMA piece into the
  parameters it holds (under ZeRO-3 its partitions: no rank gathers the model) and puts the raw ones back
  bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from data_tools import schema, storage
from data_tools.encode import load_tokenizer
from data_tools.reader import StreamingReader
from data_tools.samples import to_unit_range
from data_tools.text_encoder import TextEncoder
from hart_train import distributed as D
from hart_train import lora, zero_utils
from hart_train.models import HARTForT2I, TrainDraws
from hart_train.models.buckets import Schedule, as_schedule, image_schedule, stage_buckets
from hart_train.flops import expected_kept_last
from hart_train.models.official_layout import REGENERABLE_BUFFERS, check_regenerable_buffers
from hart_train.sampling import sample_images

# the members of one held-out sample, per data.kind, as the reader's batches hold them
SAMPLE_KEYS = {"images": ("image", "caption", "key"),
               "tokens": ("idx", "frest", "context", "context_mask", "context_position_ids", "caption", "key")}
_DIFFUSION_DRAWS, _TOKEN_DRAWS = 1, 2  # the held-out draw streams


def eval_seed(run_seed: int, index: int, stream: int) -> int:
    """The seed of held-out sample `index`'s draws of `stream`: a function of (run seed, index) alone, apart
    from every training stream (those are seeded with small integers)."""
    entropy = [run_seed % 2**64, 0x4E1D_0E7A, stream, index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


@dataclasses.dataclass
class HeldOut:
    """The held-out set as this rank evaluates it (`T2IStage._read_held_out`)."""

    num_batches: int  # evaluation micro-batches in all, over all ranks
    mine: list[tuple[int, list[int], dict]]  # this rank's: (batch index, its samples' indices, inputs on the host)
    spare: dict | None  # inputs of a batch this rank runs and discards when it has none left in a round


class T2IStage:
    partitioned_construction = True  # under ZeRO-3 the model is built partitioned (zero_utils)

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.stage_cfg = cfg.t2i
        self.device = device
        self.generator = D.generator(device)
        self.tokenizer = load_tokenizer(self.stage_cfg.tokenizer_ckpt, patch_nums=self.stage_cfg.model.patch_nums)
        self.tokenizer.to(device)
        self._text_encoder = TextEncoder(self.stage_cfg.text_encoder, device) if cfg.data.kind == "images" else None
        self.buckets = stage_buckets(self.stage_cfg.buckets, self.stage_cfg.model.patch_nums)
        self._base_sha256: str | None = None  # a LoRA run's base weights (load_init)
        self._log: dict = {}
        self._eval_reader = self._held_out_reader() if self.stage_cfg.eval_url else None
        self._held_out: HeldOut | None = None  # read at the first evaluation, then kept

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = TextEncoder(self.stage_cfg.text_encoder, self.device)
        return self._text_encoder

    @property
    def frozen_from_init(self) -> bool:
        """A LoRA run saves its adapters only: the frozen base is run.init_from's, loaded at every start."""
        return self.stage_cfg.lora is not None

    def build_model(self) -> nn.Module:
        model = HARTForT2I(self.stage_cfg.model)
        if self.stage_cfg.head_only:
            model.requires_grad_(False)
            model.diffloss.requires_grad_(True)
        if self.stage_cfg.lora is not None:  # adapters on a frozen base (hart_train.lora)
            lora.inject(model, self.stage_cfg.lora)
            lora.init_adapters(model, self.cfg.run.seed)
        if self.cfg.run.activation_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def load_init(self, module: nn.Module, path: str) -> None:
        """Start from a previous stage (or an imported official checkpoint): all weights, strictly, one
        tensor at a time into the (partitioned) model; with LoRA, into its frozen base."""
        file = f"{path.rstrip('/')}/model.safetensors"
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            lvl = f.get_tensor("lvl_1L") if "lvl_1L" in keys else None
            bias = tuple(f.get_slice("attn_bias_for_masking").get_shape()) if "attn_bias_for_masking" in keys else None
        check_regenerable_buffers(module, lvl, bias)
        targets = lora.base_targets(module) if self.stage_cfg.lora is not None else None
        zero_utils.load_safetensors(module, file, skip=REGENERABLE_BUFFERS, targets=targets)
        if self.stage_cfg.lora is not None:
            self._base_sha256 = lora.base_sha256(path)

    def checkpoint_meta(self) -> dict:
        """Plain values for the checkpoint's meta.json: a LoRA run's base weights' sha256 (`lora_base_sha256`),
        which a resume (`validate_paths`), `hart-sample` and export check the base at run.init_from against."""
        return {"lora_base_sha256": self._base_sha256} if self.stage_cfg.lora is not None else {}

    def make_reader(self, rank: int, world_size: int) -> StreamingReader:
        return StreamingReader(self.cfg.data, rank=rank, world_size=world_size)

    @torch.no_grad()
    def prepare(self, batch: dict, step: int) -> dict:
        device = self.device
        schedule = self.schedule_of(batch)
        if self.cfg.data.kind == "tokens":
            idx_BL = batch["idx"].to(device)
            idx_Bl = list(idx_BL.split([pn * pn for pn in self.stage_cfg.model.patch_nums], dim=1))
            f_rest = batch["frest"].to(device)
            context, mask = batch["context"].to(device), batch["context_mask"].to(device)
            pos = batch["context_position_ids"].to(device)
        else:
            img = to_unit_range(batch["image"]).to(device)
            idx_Bl, f_rest = self.tokenizer.img_to_idxBl_and_frest(img, patch_nums=schedule)
            context, mask, pos = self.text_encoder.encode(batch["caption"])
        x_wo_first = self.tokenizer.idxBl_to_var_input(idx_Bl, patch_nums=schedule)
        return {"context": context, "context_mask": mask, "x_BLCv_wo_first_l": x_wo_first,
                "gt_idx": idx_Bl, "f_rest_last": f_rest, "codebook": self.tokenizer.quantize.codebook(),
                "context_position_ids": pos, "generator": self.generator, "schedule": schedule}

    def schedule_of(self, batch: dict) -> Schedule | None:
        """The model's and tokenizer's `schedule` for a batch: its aspect-ratio bucket's (the reader's
        `batch["bucket"]`, (width, height) px), None for the square bucket and for token batches (square)."""
        size = batch.get("bucket")
        bucket, schedule = image_schedule(size, self.stage_cfg.model.patch_nums, self.tokenizer.cfg.downsample)
        if bucket is not None and bucket not in self.buckets:
            raise ValueError(f"a batch of bucket {bucket.name} ({size[0]}x{size[1]} px) is not in t2i.buckets "
                             f"({', '.join(b.name for b in self.buckets)})")
        return schedule

    def attention_problem(self) -> dict:
        """The training attention's shape for `run.attention: auto` to time kernels at: the micro-batch,
        heads, head dim, and the scale segments with the expected number of kept last-scale tokens, on the
        square schedule (the buckets' sequences are within a few % of its length)."""
        mc = self.stage_cfg.model
        hd = mc.embed_dim // mc.num_heads
        seg = [mc.context_token] + [p * p for p in mc.patch_nums[1:-1]] + [round(expected_kept_last(mc))]
        return {"batch": self.cfg.data.batch_size, "heads": mc.num_heads, "head_dim": hd, "seg_lens": seg,
                "scale": 0.25 / hd ** 0.5}

    def frozen_modules(self, module: nn.Module) -> list[nn.Module]:
        """What this rank holds besides the trained model: the tokenizer, and the text encoder once loaded."""
        return [self.tokenizer] + ([self._text_encoder.model] if self._text_encoder is not None else [])

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["key"])  # both kinds of batch list their samples' keys

    def after_step(self, module: nn.Module, outputs: dict, step: int) -> None:
        per_scale = torch.stack([outputs["ce_per_scale"].detach().float(), outputs["acc_per_scale"].detach().float()])
        if dist.is_initialized():
            dist.all_reduce(per_scale)
            per_scale /= dist.get_world_size()
        self._log = {f"ce/scale_{i:02d}": float(v) for i, v in enumerate(per_scale[0])}
        self._log.update({f"acc/scale_{i:02d}": float(v) for i, v in enumerate(per_scale[1])})

    def log_values(self) -> dict:
        return self._log

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -------------------------------------------------------------- held-out evaluation
    def _held_out_reader(self) -> StreamingReader:
        """A one-rank reader of `eval_url` (seed 0, no window shuffle: the same order on every rank). Built
        with the stage, so a missing or mismatched held-out set fails before the model is."""
        url = self.stage_cfg.eval_url
        rc = dataclasses.replace(self.cfg.data, urls=[url], num_workers=0, seed=0, shuffle_window=1)
        try:
            reader = StreamingReader(rc, rank=0, world_size=1)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"t2i.eval_url: {e}") from None
        if self.cfg.data.kind == "tokens":
            _check_same_encoding(url, self.cfg.data.urls[0])
        return reader

    def _read_held_out(self) -> HeldOut:
        """The first `eval_samples` good samples in the reader's order (sample i is the i-th), cut into
        micro-batches of data.batch_size, each of one aspect-ratio bucket: a sample joins its bucket's open
        batch, a batch is numbered when it fills, and the part-filled ones follow in the order of their first
        samples (unbucketed: batch c holds samples c*B..c*B+B-1). Every rank reads them all (the order is one
        rank's) and keeps, prepared (tokenizer, text encoder) on the host, its own batches only, c % world ==
        rank, and batch 0 as the spare where it has none."""
        reader, want, keys = self._eval_reader, self.stage_cfg.eval_samples, SAMPLE_KEYS[self.cfg.data.kind]
        size, rank, world = self.cfg.data.batch_size, D.rank(), D.world_size()
        open_batches: dict = {}  # bucket -> [(sample index, sample)], fewer than `size`
        closed: list[tuple[list[int], dict | None]] = []  # batch c: (its sample indices, inputs if kept)

        def close(bucket, members: list) -> None:
            c = len(closed)
            keep = c % world == rank or c == 0
            closed.append(([i for i, _ in members], self._prepare_held_out([m for _, m in members], bucket)
                           if keep else None))

        count = 0
        try:
            for batch in reader:
                if batch["epoch"] > 0:  # fewer good samples than asked for: all of them
                    break
                bucket = batch.get("bucket")
                for i in range(min(self.batch_size(batch), want - count)):
                    members = open_batches.setdefault(bucket, [])
                    members.append((count + i, {k: _sample_of(batch[k], i) for k in keys}))
                    if len(members) == size:
                        close(bucket, open_batches.pop(bucket))
                count = min(want, count + self.batch_size(batch))
                if count == want:
                    break
        finally:
            reader.close()
        for bucket, members in sorted(open_batches.items(), key=lambda item: item[1][0][0]):
            close(bucket, members)
        mine = [(c, *closed[c]) for c in range(rank, len(closed), world)]
        spare = mine[0][2] if mine else closed[0][1] if closed else None
        return HeldOut(len(closed), mine, spare)

    def _prepare_held_out(self, samples: list[dict], bucket) -> dict:
        batch = {k: torch.stack([s[k] for s in samples]) if torch.is_tensor(samples[0][k]) else [s[k] for s in samples]
                 for k in samples[0]}
        if bucket is not None:
            batch["bucket"] = bucket
        inputs = self.prepare(batch, step=0)
        return {k: _moved(v, "cpu") for k, v in inputs.items() if k not in ("codebook", "generator")}

    @torch.no_grad()
    def evaluate(self, module: nn.Module, ema, step: int) -> dict:
        """Held-out CE / accuracy per scale and diffusion loss with the raw weights (`eval/...`) and the EMA
        weights (`eval_ema/...`); {} without `eval_url`. Collective: every rank runs the same forwards."""
        if self._eval_reader is None:
            return {}
        if self._held_out is None:
            self._held_out = self._read_held_out()
        held = self._held_out
        if held.num_batches == 0:
            return {}
        was_training = module.training
        module.eval()
        # every draw here comes from its own generator; fork_rng keeps the global streams (the training's)
        # as they were whatever a frozen encoder does while preparing the first evaluation
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            values = self._evaluate_weights(module, held, "eval")
            if ema is not None:
                with ema_weights(module, ema):
                    values.update(self._evaluate_weights(module, held, "eval_ema"))
        module.train(was_training)
        return values

    def _evaluate_weights(self, module: nn.Module, held: HeldOut, prefix: str) -> dict:
        """Each batch's sums in its own row of a table, summed in batch order after the all-reduce (every
        other rank adds an exact zero to a row): the same result on any number of ranks."""
        world = D.world_size()
        sums = torch.zeros(held.num_batches, 3 * len(self.stage_cfg.model.patch_nums) + 4, dtype=torch.float64,
                           device=self.device)
        for j in range(-(-held.num_batches // world)):
            if j < len(held.mine):
                c, indices, inputs = held.mine[j]
                sums[c] = self._batch_sums(module, indices, inputs)
            else:
                self._batch_sums(module, list(range(held.spare["context"].shape[0])), held.spare)
        if dist.is_initialized():
            dist.all_reduce(sums)
        return self._held_out_values(sums.sum(dim=0), prefix)

    def _batch_sums(self, module: nn.Module, indices: list[int], inputs: dict) -> torch.Tensor:
        """One held-out micro-batch (samples `indices`, on its bucket's schedule): CE, correct tokens and
        tokens per scale, diffusion loss, mse and vb per sample (the samples of a batch have the same number
        of diffusion rows), the sample count."""
        B = len(indices)
        grids = as_schedule(inputs["schedule"] or self.stage_cfg.model.patch_nums)
        tokens = D.generator(self.device).manual_seed(eval_seed(self.cfg.run.seed, indices[0], _TOKEN_DRAWS))
        out = module(**{k: _moved(v, self.device) for k, v in inputs.items()}, codebook=self.tokenizer.quantize.codebook(),
                     generator=tokens, draws=self._held_out_draws(module, indices, grids[-1]))
        per_scale = torch.tensor([B * h * w for h, w in grids], dtype=torch.float64, device=self.device)
        diffusion = torch.stack([out["diff_loss"], out["diff_mse"], out["diff_vb"]]).double() * B
        return torch.cat([out["ce_per_scale"].double() * per_scale, out["acc_per_scale"].double() * per_scale,
                          per_scale, diffusion, per_scale.new_tensor([B])])

    def _held_out_draws(self, module: nn.Module, indices: list[int], last: tuple[int, int]) -> TrainDraws:
        """Keep every last-scale token (`last` = its h x w grid), drop no text; the diffusion timesteps and
        noise of sample i from a CPU generator seeded by (run.seed, i) (the same values on any device)."""
        mc = self.stage_cfg.model
        n, mul = last[0] * last[1], mc.diffusion_batch_mul
        steps = module.diffloss.train_diffusion.num_timesteps
        t, noise = [], []
        for i in indices:
            g = torch.Generator().manual_seed(eval_seed(self.cfg.run.seed, i, _DIFFUSION_DRAWS))
            t.append(torch.randint(0, steps, (mul, n), generator=g))
            noise.append(torch.randn(mul, n, mc.Cvae, generator=g))
        # the forward's diffusion rows are (copy m, sample b, token j) -> m*B*n + b*n + j
        dev, B = self.device, len(indices)
        return TrainDraws(keep_last_idx=torch.arange(n, device=dev).repeat(B, 1),
                          drop_text=torch.zeros(B, dtype=torch.bool, device=dev),
                          diff_t=torch.stack(t, dim=1).reshape(-1).to(dev),
                          diff_noise=torch.stack(noise, dim=1).reshape(-1, mc.Cvae).to(dev))

    def _held_out_values(self, total: torch.Tensor, prefix: str) -> dict:
        S = len(self.stage_cfg.model.patch_nums)
        ce, correct, tokens = total[:S], total[S : 2 * S], total[2 * S : 3 * S]
        diffusion, num = total[3 * S : 3 * S + 3], total[-1]
        diff_loss, diff_mse, diff_vb = (diffusion / num).tolist()
        values = {f"{prefix}/loss": float(ce.sum() / tokens.sum()) + self.stage_cfg.model.diff_weight * diff_loss,
                  f"{prefix}/ce": float(ce.sum() / tokens.sum()), f"{prefix}/acc": float(correct.sum() / tokens.sum()),
                  f"{prefix}/diff_loss": diff_loss, f"{prefix}/diff_mse": diff_mse, f"{prefix}/diff_vb": diff_vb}
        values.update({f"{prefix}/ce/scale_{i:02d}": float(v) for i, v in enumerate(ce / tokens)})
        values.update({f"{prefix}/acc/scale_{i:02d}": float(v) for i, v in enumerate(correct / tokens)})
        return values

    @torch.no_grad()
    def images(self, module: nn.Module, ema, step: int) -> dict[str, np.ndarray]:
        """A grid for the fixed prompts (collective under ZeRO-3: every rank runs the same sampling)."""
        s = self.stage_cfg
        if not s.sample_prompts:
            return {}
        was_training = module.training
        module.eval()
        imgs = sample_images(module, self.tokenizer, self.text_encoder, list(s.sample_prompts), seed=s.sample_seed,
                             cfg_scale=s.sample_cfg, top_k=s.sample_top_k, device=self.device)
        module.train(was_training)
        grid = torch.cat(list(imgs), dim=2)  # 3, H, N*W
        return {"samples": (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()}


def _sample_of(member, i: int):
    """Sample i of a batch member: a copy of its row (not a view that keeps the whole batch alive), or the item."""
    return member[i].clone() if torch.is_tensor(member) else member[i]


def _moved(v, device):
    """A prepared input (a tensor or a list of per-scale tensors) on `device`; the schedule as it is."""
    if isinstance(v, list):
        return [t.to(device) for t in v]
    return v.to(device) if torch.is_tensor(v) else v


def _token_encoding(url: str) -> dict:
    options = schema.Manifest.from_json(storage.read_text(storage.join(url, schema.MANIFEST_NAME)),
                                        where=storage.redact(url)).options
    text = options.get("text_encoder", {})
    return {"tokenizer weights sha256": options.get("tokenizer_sha256"), "patch_nums": options.get("patch_nums"),
            **{f"text encoder {k}": text.get(k) for k in ("resolved_kind", "max_length", "use_system_prompt", "hidden_size")}}


def _check_same_encoding(eval_url: str, train_url: str) -> None:
    """Held-out token shards must be encoded as the training ones (which `validate_paths` matched to the run)."""
    ours, held = _token_encoding(train_url), _token_encoding(eval_url)
    for what, value in ours.items():
        if held[what] != value:
            raise ValueError(f"t2i.eval_url: its token shards were encoded with {what} {held[what]!r}, data.urls[0]'s "
                             f"with {value!r}; encode the held-out set as the training set (`hart-data encode`)")


# ---------------------------------------------------------------------- EMA weights in place
@contextlib.contextmanager
def ema_weights(module: nn.Module, ema) -> Iterator[None]:
    """`module` computes with the EMA weights inside the block; its raw weights come back bit for bit after.
    Collective. Each rank writes what it holds: under ZeRO-3 its partition of each parameter (the EMA keeps
    exactly that piece), otherwise the whole weight, assembled from the EMA's pieces one at a time."""
    held = [p.ds_tensor if hasattr(p, "ds_id") else p.data for p in ema.params]
    raw = [t.clone() for t in held]
    _write_held(module, held, [_whole_or_piece(p, s, ema.device) for p, s in zip(ema.params, ema.shadow)])
    try:
        yield
    finally:
        _write_held(module, held, raw)


def _whole_or_piece(p: nn.Parameter, shadow: torch.Tensor, device) -> torch.Tensor:
    """What this rank writes for `p`: its ZeRO-3 partition, or the whole weight (collective where the EMA is
    in fragments, ZeRO-1/2 and DeepSpeed's bf16 optimizer: disjoint fragments sum to the weight)."""
    if hasattr(p, "ds_id") or not hasattr(p, "_hp_mapping"):
        return shadow
    whole = torch.zeros(p.numel(), dtype=torch.float32, device=device)
    if p._hp_mapping is not None:
        a = p._hp_mapping.lp_fragment_address
        whole.narrow(0, a.start, a.numel).copy_(shadow)
    if dist.is_initialized():
        dist.all_reduce(whole)
    return whole


@torch.no_grad()
def _write_held(module: nn.Module, held: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Copy `values` into the storage each parameter is held in. Under ZeRO-3 a parameter gathered whole
    keeps its gathered copy, which a forward would use instead of the partition: the persistent small ones,
    those kept for reuse and those prefetched after the last forward. So every gather is first completed and
    released, and the persistent ones are gathered again afterwards, as DeepSpeed's optimizer step leaves them."""
    zero3 = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if zero3:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        inflight = getattr(module, "ds_inflight_param_registry", {})
        for handle in list(inflight.values()):
            handle.wait()
        inflight.clear()
        gathered = [p for p in zero3 if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(gathered)
    for t, v in zip(held, values):
        t.copy_(v.view_as(t))
    persistent = [p for p in zero3 if p.ds_persist]
    if persistent:
        persistent[0].all_gather(persistent)
