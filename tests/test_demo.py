"""The demo's pieces (hart_train.demo), fast: report writer, grid difference measure, dataset split commands,
the S3 mode's server start/stop. The 15-minute end-to-end run itself is `python -m hart_train.demo`."""

from __future__ import annotations

import json
import os
import uuid

import botocore.exceptions
import fsspec
import numpy as np
import pytest
from braceexpand import braceexpand
from PIL import Image

from hart_train import demo


def _write_metrics(run_dir: str, num_steps: int, with_eval: bool) -> None:
    os.makedirs(os.path.join(run_dir, "wandb", "offline-run-20260101_000000-abc"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(10, num_steps + 1, 10):
            f.write(json.dumps({"step": step, "time": 1.0, "loss": 1.0 / step, "recon": 0.5 / step, "lr": 1e-3,
                                "codebook/perplexity": 3.0}) + "\n")
        if with_eval:
            f.write(json.dumps({"step": num_steps, "time": 2.0, "eval/psnr_discrete": 21.5,
                                "eval/ssim_discrete": 0.7, "eval/psnr_continuous": 25.0,
                                "eval/ssim_continuous": 0.8}) + "\n")


def _write_t2i_metrics(run_dir: str, num_steps: int) -> None:
    """Training lines every 10 steps and held-out lines (raw and EMA weights) every 50, as the t2i stage logs them."""
    os.makedirs(os.path.join(run_dir, "wandb", "offline-run-20260101_000000-abc"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(10, num_steps + 1, 10):
            f.write(json.dumps({"step": step, "time": 1.0, "loss": 3.0 / step + 1, "ce": 2.0 / step + 1,
                                "acc": 0.1, "diff_loss": 1.0 / step}) + "\n")
            if step % 50 == 0:
                held = {f"{p}/{k}": v + (0.1 if p == "eval_ema" else 0.0) for p in ("eval", "eval_ema")
                        for k, v in (("loss", 2.0), ("ce", 1.5), ("acc", 0.2), ("diff_loss", 0.5),
                                     ("ce/scale_00", 1.0))}
                f.write(json.dumps({"step": step, "time": 2.0, **held}) + "\n")


def _grid(path: str, rows: int, cols: int, size: int = 8) -> None:
    """Row r is a flat image of value 40*r; within a row all cells are equal."""
    img = np.zeros((rows * size, cols * size, 3), np.uint8)
    for r in range(rows):
        img[r * size:(r + 1) * size] = 40 * r
    Image.fromarray(img).save(path)


def test_loss_table_samples_about_every_tenth_and_keeps_only_losses():
    records = [{"step": s, "time": 0.0, "loss": float(s), "ce": 1.0, "lr": 0.1, "codebook/x": 2.0}
               for s in range(10, 1001, 10)]
    records[-1]["gan_g"] = 0.5  # a term that starts late gets a column, blank before
    records.append({"step": 1000, "eval/psnr_discrete": 20.0})
    table = demo.loss_table(records)
    assert [r["step"] for r in table] == [10] + [round(i * 99 / 10) * 10 + 10 for i in range(1, 11)]
    assert list(table[0]) == ["step", "loss", "gan_g", "ce"]
    assert table[0]["gan_g"] == "" and table[-1]["gan_g"] == 0.5
    assert demo.loss_table([]) == []


def test_row_differences_separate_prompts_from_seeds(tmp_path):
    path = str(tmp_path / "g.png")
    _grid(path, rows=3, cols=4)
    d = demo.row_differences(path, rows=3)
    assert d["within_prompt_mean"] == 0.0
    assert d["between_prompts_min"] == pytest.approx(40.0)
    assert d["between_prompts_mean"] == pytest.approx((40 + 80 + 40) / 3)


def test_report_has_timings_losses_psnr_and_paths(tmp_path):
    out, runs = str(tmp_path), str(tmp_path / "runs")
    for name, _ in demo.STAGES:
        if name == "demo-t2i":
            _write_t2i_metrics(os.path.join(runs, name), 100)
        else:
            _write_metrics(os.path.join(runs, name), 100, with_eval=True)
    grid = str(tmp_path / "samples.png")
    _grid(grid, rows=len(demo.PROMPTS), cols=demo.IMAGES_PER_PROMPT)
    timings = demo.Timings({"dataset": 20.0, "demo-tokenizer-vq": 300.0, "demo-tokenizer-hybrid": 150.0,
                            "demo-t2i": 400.0, "hart-sample": 30.0})
    ckpts = {name: os.path.join(runs, name, "ckpt", "step_00000100") for name, _ in demo.STAGES}
    report = demo.collect_report(out, runs, ckpts, grid, timings, "local directory")
    md_path = demo.write_report(report, out)

    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved["total_s"] == 900.0 and saved["grid"] == grid
    vq = saved["stages"]["demo-tokenizer-vq"]
    assert vq["eval"]["eval/psnr_discrete"] == 21.5 and vq["losses"][-1]["step"] == 100
    assert vq["wandb"][0].endswith("offline-run-20260101_000000-abc")
    t2i = saved["stages"]["demo-t2i"]
    assert t2i["eval"]["step"] == 100 and t2i["eval"]["eval/ce"] == 1.5 and t2i["eval"]["eval_ema/ce"] == 1.6
    assert vq["heldout_plot"] is None and Image.open(t2i["heldout_plot"]).size == (1000, 360)
    assert Image.open(saved["grid_labelled"]).height == len(demo.PROMPTS) * (demo.CELL_PX + demo.GAP_PX)
    md = open(md_path).read()
    assert "PSNR discrete-only 21.50 dB" in md and "continuous 25.00 dB" in md
    assert "| demo-t2i | 400.0 |" in md and grid in md and "step_00000100" in md
    # the labelled grid and the held-out plot, linked relative to report.md; the last held-out numbers
    assert "![samples, one row per prompt](samples_labelled.png)" in md
    assert "![held-out and training losses of demo-t2i](heldout_demo-t2i.png)" in md
    assert "Held-out losses at step 100" in md and "| raw | 2 | 1.5 | 0.2 | 0.5 |" in md
    assert "| EMA | 2.1 | 1.6 | 0.3 | 0.6 |" in md and "## Evaluation" not in md


def test_labelled_grid_puts_each_prompt_beside_its_samples_upscaled_without_smoothing(tmp_path):
    rows, cols, size = 3, 4, 32
    raw = np.random.default_rng(0).integers(0, 256, (rows * size, cols * size, 3), dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / "grid.png")
    prompts = ["red apple", "rocket", "a much longer prompt than the others"]
    demo.labelled_grid(str(tmp_path / "grid.png"), prompts, str(tmp_path / "labelled.png"))
    out = np.asarray(Image.open(tmp_path / "labelled.png").convert("RGB"))
    cell, step = demo.CELL_PX, demo.CELL_PX + demo.GAP_PX
    label_w = out.shape[1] - cols * step
    assert out.shape[0] == rows * step and label_w > 0
    # every sample 4x with nearest neighbour: its pixels, each as a 4x4 block, nothing interpolated
    for r in range(rows):
        for c in range(cols):
            shown = out[r * step : r * step + cell, label_w + c * step : label_w + c * step + cell]
            sample = raw[r * size : (r + 1) * size, c * size : (c + 1) * size]
            assert (shown == sample.repeat(cell // size, axis=0).repeat(cell // size, axis=1)).all(), (r, c)
    # one label per row, centred on it, as wide as its prompt
    ink = np.argwhere(out[:, :label_w].min(axis=2) < 128)
    ink_right = []
    for r in range(rows):
        in_row = ink[(ink[:, 0] >= r * step) & (ink[:, 0] < (r + 1) * step)]
        assert len(in_row) > 0 and abs(in_row[:, 0].mean() - (r * step + cell / 2)) < cell / 4, r
        ink_right.append(in_row[:, 1].max())
    assert ink_right[1] < ink_right[0] < ink_right[2]  # "rocket" < "red apple" < the long one


def test_add_evaluation_puts_hart_eval_results_into_the_report(tmp_path):
    out, runs = str(tmp_path), str(tmp_path / "runs")
    for name, _ in demo.STAGES:
        _write_metrics(os.path.join(runs, name), 20, with_eval=False)
    grid = str(tmp_path / "samples.png")
    _grid(grid, rows=len(demo.PROMPTS), cols=demo.IMAGES_PER_PROMPT)
    report = demo.collect_report(out, runs, {}, grid, demo.Timings({"dataset": 1.0}), "local directory")
    report["eval_run"] = {"generated": str(tmp_path / "gen"), "num_images": 64, "results": [],
                          "skipped": ["clip: set HART_CLIP_MODEL to its network's local file or directory"]}
    fid = tmp_path / "fid.json"  # the layout hart-eval writes (hart_train.evaluation.report)
    fid.write_text(json.dumps({"title": "FID", "numbers": {"fid": 41.25, "num_fake": 64},
                               "settings": {"preprocessing": "clean"}}))
    demo.add_evaluation(report, str(fid))
    md = open(demo.write_report(report, out)).read()
    assert json.load(open(tmp_path / "report.json"))["evaluation"][0]["results"]["numbers"]["fid"] == 41.25
    section = md[md.index("## Evaluation"):]
    assert str(fid) in section and "| fid | 41.25 |" in section and "| num_fake | 64 |" in section
    assert "64 captions" in section and "skipped clip: set HART_CLIP_MODEL" in section


def test_dataset_split_holds_out_one_shard():
    cmds = demo.dataset_commands("s3://b")
    assert [url for url, _ in cmds] == ["s3://b/emoji-all", "s3://b/emoji-train", "s3://b/emoji-heldout"]
    train_src, heldout_src = cmds[1][1][2], cmds[2][1][2]
    train_shards = list(braceexpand(train_src.removeprefix("wds:")))
    held = f"s3://b/emoji-all/shard-{demo.HELDOUT_SHARD:06d}.tar"
    assert heldout_src == "wds:" + held
    assert held not in train_shards and len(train_shards) == 7 and len(set(train_shards)) == 7


def test_s3_server_serves_then_stops():
    with demo.s3_server() as env:
        assert set(env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}
        with demo.patched_environ(env):
            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            bucket = "demo-" + uuid.uuid4().hex[:8]
            fs.mkdir(bucket)
            fs.pipe(f"{bucket}/emoji-train/manifest.json", b"{}")
            assert demo.dataset_exists(f"s3://{bucket}/emoji-train")
            assert not demo.dataset_exists(f"s3://{bucket}/emoji-heldout")
    assert os.environ.get("AWS_ENDPOINT_URL") != env["AWS_ENDPOINT_URL"]
    import boto3
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="demo",
                          aws_secret_access_key="demo", region_name="us-east-1",
                          config=botocore.config.Config(retries={"max_attempts": 0}, connect_timeout=2))
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client.list_buckets()


def _tar_dataset(root, captions: list[str]) -> None:
    import io
    import tarfile

    os.makedirs(root)
    with tarfile.open(os.path.join(root, "shard-000000.tar"), "w") as tar:
        for i, caption in enumerate(captions):
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"k{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_t2i_subset_holds_the_prompts_and_plain_captions(tmp_path, monkeypatch):
    others = [f"thing {i}" for i in range(20)] + [f"person {i}: dark skin tone" for i in range(20)]
    _tar_dataset(str(tmp_path / "train"), others[:10] + demo.PROMPTS + others[10:])
    monkeypatch.setattr(demo, "T2I_CAPTIONS", len(demo.PROMPTS) + 5)
    chosen = demo.write_t2i_subset(str(tmp_path / "train"), str(tmp_path / "folder"))
    assert chosen[:len(demo.PROMPTS)] == demo.PROMPTS
    assert chosen[len(demo.PROMPTS):] == [f"thing {i}" for i in (0, 4, 8, 12, 16)]
    apple = demo.PROMPTS.index("red apple")
    assert open(tmp_path / "folder" / f"{apple:03d}.txt").read() == "red apple"
    assert Image.open(tmp_path / "folder" / f"{apple:03d}.png").getpixel((0, 0)) == (10 + apple, 0, 0)
