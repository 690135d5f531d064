"""Shared fixtures: a real S3 server (moto) on 127.0.0.1, started once per test session."""

from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3 HTTP server on a free loopback port and point the AWS env vars at it.

    Credentials and endpoint go through the environment, exactly as a user's would, so the code
    under test takes the same path as against AWS or MinIO.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test; returns its s3:// URL."""
    import fsspec

    name = "t-" + uuid.uuid4().hex[:12]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def emoji_dataset(tmp_path_factory):
    """A local emoji dataset (512 real image-caption pairs at 32px), built once per test session."""
    from data_tools.shard import shard_dataset

    out = tmp_path_factory.mktemp("emoji") / "shards"
    shard_dataset("emoji", str(out), resolution=32, fmt="png", samples_per_shard=128, workers=1,
                  limit=512, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer_reference(emoji_dataset, tmp_path_factory):
    """An uninterrupted 2-rank tokenizer-vq run (see runs.tokenizer_overrides): the reference that
    resumed, relaunched and fault-injected runs must reproduce."""
    from procs import check, run_train
    from runs import TOKENIZER_CONFIG, tokenizer_overrides

    out = tmp_path_factory.mktemp("reference")
    check(run_train(TOKENIZER_CONFIG, tokenizer_overrides(emoji_dataset, out, "ref"), nproc=2))
    return out / "ref"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one intra-op thread, and on a busy 2-core machine two threads make them
    several times slower (oversubscription). Modules opt in with pytestmark = usefixtures(...)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tokenizer_ckpt(tmp_path_factory):
    """A tiny tokenizer checkpoint directory (random weights, seed 0) for the t2i stages."""
    from runs import make_tokenizer_ckpt

    return make_tokenizer_ckpt(tmp_path_factory.mktemp("tok"), seed=0)


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    """A tiny Qwen2 text encoder with random weights, saved as a local model directory."""
    from text_models import save_tiny_qwen

    return save_tiny_qwen(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def t2i_args(emoji_dataset, tokenizer_ckpt, qwen):
    """`t2i_args(out, name, *extra)`: the shipped full-size t2i configs at small width (runs.fullsize_t2i_overrides)."""
    from runs import fullsize_t2i_overrides

    def args(out, name: str, *extra: str) -> list[str]:
        return fullsize_t2i_overrides(emoji_dataset, out, name, tokenizer_ckpt, qwen, *extra)

    return args


@pytest.fixture(scope="session")
def bf16_reference(t2i_args, tmp_path_factory):
    """An uninterrupted 2-rank run of configs/t2i_256.yaml (bf16, ZeRO-3) at small width: the reference
    that killed, preempted and relaunched t2i runs must reproduce."""
    from procs import check, run_train

    out = tmp_path_factory.mktemp("bf16")
    check(run_train("configs/t2i_256.yaml", t2i_args(out, "ref")))
    return out / "ref"
