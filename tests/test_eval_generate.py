"""`hart-eval generate`: the three prompt formats and their layouts, byte-identical output over 1 and 2
ranks, a killed launch resumed, a subset, refusals. A tiny random t2i checkpoint with the packaged MiniLM
text encoder; ranks are real processes under torch.distributed.run (gloo, CPU)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from hart_train import config as C
from hart_train.evaluation.cli import main
from hart_train.evaluation.prompts import detect_format, read_prompts
from hart_train.models import HARTForT2I, hart_config
from procs import REPO, env, free_port, kill_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the ranks run with OMP_NUM_THREADS=1 too

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "apple", "count": 1}], "prompt": "a photo of an apple"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a cat and a dog"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "counting", "include": [{"class": "bird", "count": 3}], "prompt": "a photo of three birds"},
    {"tag": "position", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup left of a book"},
]
# 5 prompts x 2 images in units of 3: units cut prompts, the last unit is short, and prompts 2..3 (images
# 4..7) cut a unit at both ends
RUN = ["--images-per-prompt", "2", "--batch-size", "3"]


@pytest.fixture(scope="module")
def t2i_ckpt(tokenizer_ckpt, tmp_path_factory) -> Path:
    """A t2i checkpoint directory as a run writes it: config.yaml, model.safetensors, ema.safetensors."""
    torch.manual_seed(0)
    cfg = hart_config("tiny", context_dim=384)  # MiniLM's width
    model = HARTForT2I(cfg)
    with torch.no_grad():  # VAR's init gives near-uniform logits; sharpen them so seeds give distinct images
        model.head.weight.normal_(std=0.5)
    out = tmp_path_factory.mktemp("t2i") / "step_00000001"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    ema = {k: (p.detach() + 0.01 * torch.randn_like(p)).contiguous() for k, p in model.named_parameters()}
    save_file(ema, str(out / "ema.safetensors"))
    t2i = {"model": cfg, "tokenizer_ckpt": str(tokenizer_ckpt),
           "text_encoder": {"kind": "minilm", "path": "", "max_length": cfg.context_token}}
    (out / "config.yaml").write_text(yaml.safe_dump(C.to_dict({"stage": "t2i", "t2i": t2i})))
    return out


@pytest.fixture(scope="module")
def geneval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL))
    return path


def _args(ckpt: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--device", "cpu", *extra]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _launch(args: list[str], nproc: int, extra_env: dict | None = None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "hart_train.evaluation.cli", *args]
    return subprocess.Popen(cmd, cwd=REPO, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def reference(t2i_ckpt, geneval_file, tmp_path_factory) -> dict[str, bytes]:
    """An uninterrupted one-process run (in-process, the CLI's own main)."""
    out = tmp_path_factory.mktemp("ref") / "gen"
    assert main(_args(t2i_ckpt, geneval_file, out, *RUN)) == 0
    return _tree(out)


def test_the_three_prompt_formats_are_read_and_laid_out(t2i_ckpt, tmp_path):
    mjhq = {"3f2a": {"prompt": "a castle at dusk", "category": "landscape"},
            "09bc": {"prompt": "portrait of a fox", "category": "animals"}}
    (tmp_path / "meta_data.json").write_text(json.dumps(mjhq))
    (tmp_path / "geneval.jsonl").write_text(json.dumps(GENEVAL[0]) + "\n\n" + json.dumps(GENEVAL[1]) + "\n")
    (tmp_path / "prompts.txt").write_text("  a red apple \n\nrocket launch\n")
    (tmp_path / "no_suffix").write_text(json.dumps(GENEVAL[0]) + "\n")

    m = read_prompts(str(tmp_path / "meta_data.json"))
    assert m.format == "mjhq"
    assert [(r.index, r.key, r.prompt, r.category) for r in m.records] == [
        (0, "3f2a", "a castle at dusk", "landscape"), (1, "09bc", "portrait of a fox", "animals")]
    g = read_prompts(str(tmp_path / "geneval.jsonl"))
    assert g.format == "geneval" and [r.source for r in g.records] == GENEVAL[:2] and g.records[1].index == 1
    t = read_prompts(str(tmp_path / "prompts.txt"))
    assert t.format == "text" and [r.prompt for r in t.records] == ["a red apple", "rocket launch"]
    assert detect_format(str(tmp_path / "no_suffix")) == "geneval"  # from the content
    assert read_prompts(str(tmp_path / "prompts.txt"), "text").sha256() == t.sha256()
    assert read_prompts(str(tmp_path / "no_suffix"), "text").records[0].prompt == json.dumps(GENEVAL[0])  # forced

    for name in ("meta_data.json", "prompts.txt"):
        assert main(_args(t2i_ckpt, tmp_path / name, tmp_path / name.split(".")[0])) == 0
    assert sorted(_tree(tmp_path / "meta_data")) == ["animals/09bc.json", "animals/09bc.png", "landscape/3f2a.json",
                                                     "landscape/3f2a.png", "settings.json"]
    assert sorted(_tree(tmp_path / "prompts")) == ["00000_0000.json", "00000_0000.png", "00001_0000.json",
                                                   "00001_0000.png", "settings.json"]
    side = json.loads((tmp_path / "meta_data" / "animals" / "09bc.json").read_text())
    assert (side["prompt"], side["seed"], side["key"], side["settings"]["cfg_scale"]) == ("portrait of a fox", 2, "09bc", 4.5)


@pytest.mark.parametrize("name, content, message", [
    ("meta_data.json", '{"a": {"prompt": "x", "category": "c"},', "not valid JSON"),
    ("meta_data.json", '{"a": {"category": "c"}}', "entry 'a' has no non-empty string \"prompt\""),
    ("meta_data.json", '{"a": {"prompt": "x", "category": "../up"}}', "cannot be a file name"),
    ("evaluation_metadata.jsonl", '{"prompt": "x"}\n{"prompt": \n', r"evaluation_metadata.jsonl:2: not JSON"),
    ("evaluation_metadata.jsonl", '{"prompt": "x"}\n["x"]\n', r"evaluation_metadata.jsonl:2: .*non-empty \"prompt\""),
    ("prompts.txt", "\n  \n", "no prompts"),
])
def test_a_malformed_prompt_file_is_one_clear_error(t2i_ckpt, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    assert main(_args(t2i_ckpt, tmp_path / name, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hart-eval generate: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_two_ranks_write_the_bytes_one_rank_writes(t2i_ckpt, geneval_file, reference, tmp_path):
    proc = _launch(_args(t2i_ckpt, geneval_file, tmp_path / "gen", *RUN), nproc=2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert _tree(tmp_path / "gen") == reference
    # the GenEval layout, each prompt's line beside its samples, every image its own seed
    assert sorted(reference) == sorted(["settings.json"] + [
        f"{i:05d}/{f}" for i in range(5) for f in ("metadata.jsonl", "samples/0000.json", "samples/0000.png",
                                                     "samples/0001.json", "samples/0001.png")])
    assert [json.loads(reference[f"{i:05d}/metadata.jsonl"]) for i in range(5)] == GENEVAL
    side = json.loads(reference["00003/samples/0001.json"])
    assert (side["prompt"], side["seed"], side["prompt_index"], side["image_index"]) == (GENEVAL[3]["prompt"], 8, 3, 1)
    assert len({v for k, v in reference.items() if k.endswith(".png")}) == 10


def test_a_killed_launch_resumes_without_redoing_or_duplicating(t2i_ckpt, geneval_file, reference, tmp_path):
    """Each rank holds after the PNG of its 2nd image (before its sidecar); the whole launch is SIGKILLed
    there, then the run is resumed by one process."""
    gen = tmp_path / "gen"
    proc = _launch(_args(t2i_ckpt, geneval_file, gen, *RUN), nproc=2, extra_env={"HART_FAULT_HOLD_IMAGE": "2:300"},
                   start_new_session=True)
    deadline = time.time() + 240
    while len(_unfinished(gen)) < 2:  # both ranks in their hold
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline, "the ranks did not reach their hold"
        time.sleep(0.1)
    kill_group(proc)
    killed = _tree(gen)
    assert len([k for k in killed if k.endswith(".png")]) == 4 and len(_unfinished(gen)) == 2
    finished = [p for p in killed if p.endswith(".json") and "/samples/" in p]
    done = {p: (gen / p).stat().st_mtime_ns for s in finished for p in (s, s[:-5] + ".png")}
    (gen / "00001" / "samples" / ".0001.png.tmp-1-999").write_bytes(b"half an image")  # as if killed mid-write

    assert main(_args(t2i_ckpt, geneval_file, gen, *RUN)) == 0
    assert _tree(gen) == reference  # no duplicate, no leftover, the same bytes
    assert {p: (gen / p).stat().st_mtime_ns for p in done} == done  # finished images were not redone


def _unfinished(gen: Path) -> list[Path]:
    return [p for p in gen.rglob("*.png") if not p.with_suffix(".json").exists()]


def test_a_subset_reproduces_the_same_images(t2i_ckpt, geneval_file, reference, tmp_path):
    assert main(_args(t2i_ckpt, geneval_file, tmp_path / "a", *RUN, "--start", "2", "--end", "4")) == 0
    expected = {k: v for k, v in reference.items() if k == "settings.json" or k[:5] in ("00002", "00003")}
    assert _tree(tmp_path / "a") == expected
    assert main(_args(t2i_ckpt, geneval_file, tmp_path / "a", *RUN, "--start", "4", "--limit", "9")) == 0  # grows
    assert _tree(tmp_path / "a") == {k: v for k, v in reference.items() if k[:5] not in ("00000", "00001")}


def test_the_batch_size_changes_no_image_beyond_rounding(t2i_ckpt, geneval_file, reference, tmp_path):
    """Each image's random draws are its own: alone in its batch it is the same image, up to the last bits of
    the arithmetic (which is why a DIR is tied to one batch size)."""
    assert main(_args(t2i_ckpt, geneval_file, tmp_path / "b1", "--images-per-prompt", "2", "--batch-size", "1")) == 0
    alone = _tree(tmp_path / "b1")
    for name in (k for k in reference if k.endswith(".png")):
        a, b = (np.asarray(Image.open(io.BytesIO(t[name])), dtype=np.int16) for t in (alone, reference))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, name


def test_other_settings_are_refused_unless_overwrite(t2i_ckpt, geneval_file, reference, tmp_path, capsys):
    gen = tmp_path / "gen"
    for p, v in reference.items():
        (gen / p).parent.mkdir(parents=True, exist_ok=True)
        (gen / p).write_bytes(v)
    capsys.readouterr()
    assert main(_args(t2i_ckpt, geneval_file, gen, *RUN, "--cfg", "2.0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings.cfg_scale is 4.5 there, 2.0 now" in err[0] and "--overwrite" in err[0], err
    assert main(_args(t2i_ckpt, geneval_file, gen, "--batch-size", "2", "--images-per-prompt", "2")) == 2
    assert "settings.batch_size is 3 there, 2 now" in capsys.readouterr().err
    assert _tree(gen) == reference  # untouched

    assert main(_args(t2i_ckpt, geneval_file, gen, *RUN, "--cfg", "2.0", "--overwrite")) == 0
    redone = _tree(gen)
    assert sorted(redone) == sorted(reference)
    assert json.loads(redone["settings.json"])["settings"]["cfg_scale"] == 2.0
    assert all(redone[k] != reference[k] for k in reference if k.endswith(".png"))

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.png").write_bytes(b"not ours")
    assert main(_args(t2i_ckpt, geneval_file, tmp_path / "foreign", *RUN, "--overwrite")) == 2
    assert "not empty and has no settings.json" in capsys.readouterr().err
    assert (tmp_path / "foreign" / "x.png").read_bytes() == b"not ours"


def test_a_missing_model_is_one_clear_error(geneval_file, tmp_path, capsys):
    assert main(_args(tmp_path / "nope", geneval_file, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--model {tmp_path / 'nope'}: no such directory" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def bucket_ckpt(t2i_ckpt, tmp_path_factory) -> Path:
    """t2i_ckpt with aspect-ratio buckets for the tiny model's (1, 2, 4) schedule in its config.yaml."""
    out = tmp_path_factory.mktemp("t2i-buckets") / "step_00000001"
    shutil.copytree(t2i_ckpt, out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["t2i"]["buckets"] = ["4x4", "3x5", "5x3"]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out


def test_aspect_samples_the_nearest_bucket_and_ties_the_out_dir_to_it(bucket_ckpt, geneval_file, tmp_path, capsys):
    gen = tmp_path / "gen"
    run = ["--limit", "2", "--images-per-prompt", "1", "--batch-size", "2"]
    assert main(_args(bucket_ckpt, geneval_file, gen, *run, "--aspect", "16:9")) == 0
    assert "--aspect 16:9 -> bucket 3x5 (12x20 px" in capsys.readouterr().err
    pngs = sorted(gen.rglob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (20, 12) for p in pngs)  # PIL: (width, height)
    assert json.loads((gen / "settings.json").read_text())["settings"]["bucket"] == "3x5"
    before = _tree(gen)
    # each image's own draws on the bucket (image_draws): batch-mates change no image beyond rounding
    assert main(_args(bucket_ckpt, geneval_file, tmp_path / "b1", *run[:-1], "1", "--aspect", "16:9")) == 0
    alone = _tree(tmp_path / "b1")
    for name in (k for k in before if k.endswith(".png")):
        a, b = (np.asarray(Image.open(io.BytesIO(t[name])), dtype=np.int16) for t in (alone, before))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, name
    assert main(_args(bucket_ckpt, geneval_file, gen, *run, "--aspect", "9:16")) == 2
    assert "settings.bucket is '3x5' there, '5x3' now" in capsys.readouterr().err
    assert main(_args(bucket_ckpt, geneval_file, gen, *run)) == 2  # square
    assert "settings.bucket is '3x5' there, None now" in capsys.readouterr().err
    assert main(_args(bucket_ckpt, geneval_file, gen, *run, "--aspect", "1.7:1")) == 0  # the same bucket: resumes
    assert _tree(gen) == before
    capsys.readouterr()
    assert main(_args(bucket_ckpt, geneval_file, tmp_path / "bad", *run, "--aspect", "16x9")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected '<width>:<height>'" in err[0], err
    # the square bucket is the square run: its settings record no bucket, so a run before --aspect resumes
    assert main(_args(bucket_ckpt, geneval_file, tmp_path / "sq", *run, "--aspect", "1:1")) == 0
    assert json.loads((tmp_path / "sq" / "settings.json").read_text())["settings"]["bucket"] is None
    assert all(Image.open(p).size == (16, 16) for p in (tmp_path / "sq").rglob("*.png"))


def test_hart_sample_aspect(bucket_ckpt, tmp_path, capsys):
    from hart_train import sample_cli

    base = ["--model", str(bucket_ckpt), "--prompt", "red apple", "--prompt", "rocket", "--batch", "3"]
    assert sample_cli.main([*base, "--aspect", "9:16", "--out", str(tmp_path / "tall.png")]) == 0
    assert "hart-sample: --aspect 9:16 -> bucket 5x3 (20x12 px" in capsys.readouterr().err
    assert Image.open(tmp_path / "tall.png").size == (3 * 12, 2 * 20)  # 3 columns, 2 rows of 12 x 20 (w x h)
    assert sample_cli.main([*base, "--aspect", "wide", "--out", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--aspect" in err[0] and "expected '<width>:<height>'" in err[0], err
    assert not (tmp_path / "bad.png").exists()
