"""The Inception-v3 network FID is defined with: the TensorFlow graph `inception-2015-12-05` that the
original FID code (TTUR) ran, as ported to PyTorch by pytorch-fid and torch-fidelity.

Design decisions:
- Written here, not imported, because every library that ships this network imports torchvision on
  its way in (torch-fidelity's package `__init__`, clean-fid's `utils`, torchmetrics through
  torch-fidelity), and torchvision cannot sit beside our CPU torch. The module and parameter names
  are the ones of the published weights file, so that file loads strictly; the layer order, pooling
  and padding reproduce the TF graph's differences from torchvision's Inception-v3 (average pools
  that do not count padding, a max pool in the last block, BatchNorm eps 1e-3).
- The published file (`WEIGHTS_FILE`) is the only source of weights: nothing here downloads, and a
  missing file is one error naming the file, where it is published and its sha256.
- Input is float RGB in [0, 255], already resized to 299x299 by the caller (`hart_train.evaluation.fid`
  owns the resize, so the resize is one visible, recorded choice); the graph's own first step,
  (x - 128) / 128, happens here. Output: the 2048-d pool3 features FID uses.

Shape letters: N batch, C channels, H/W spatial.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
NUM_FEATURES = 2048
WEIGHTS_ENV = "HART_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILE
# pytorch-fid publishes the same conversion as pt_inception-2015-12-05-6726825d.pth (same hash prefix,
# same layout); it loads too. The full hash is from a third-party record of the torch-fidelity file; its
# first 8 hex digits are the ones torch.hub puts in the published file name.
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x_NCHW)))


def _avg_pool_3x3(x_NCHW: torch.Tensor) -> torch.Tensor:
    # TF averages over the valid pixels only at the border
    return F.avg_pool2d(x_NCHW, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (Mixed_5b/5c/5d)."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x_NCHW)
        b = self.branch5x5_2(self.branch5x5_1(x_NCHW))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x_NCHW)))
        d = self.branch_pool(_avg_pool_3x3(x_NCHW))
        return torch.cat([a, b, c, d], dim=1)


class ReductionA(nn.Module):
    """35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (Mixed_6a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x_NCHW)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x_NCHW)))
        c = F.max_pool2d(x_NCHW, 3, stride=2)
        return torch.cat([a, b, c], dim=1)


class MixedB(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x_NCHW)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x_NCHW)))
        c = self.branch7x7dbl_1(x_NCHW)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = conv(c)
        d = self.branch_pool(_avg_pool_3x3(x_NCHW))
        return torch.cat([a, b, c, d], dim=1)


class ReductionB(nn.Module):
    """17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (Mixed_7a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x_NCHW))
        b = self.branch7x7x3_1(x_NCHW)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = conv(b)
        c = F.max_pool2d(x_NCHW, 3, stride=2)
        return torch.cat([a, b, c], dim=1)


class MixedC(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (Mixed_7b, Mixed_7c). The TF graph pools differently in
    its two such blocks: an average pool in the first, a max pool in the second (`max_pool`)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x_NCHW)
        b = self.branch3x3_1(x_NCHW)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x_NCHW))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        pooled = F.max_pool2d(x_NCHW, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x_NCHW)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], dim=1)


class FIDInceptionV3(nn.Module):
    """(N, 3, 299, 299) float RGB in [0, 255] -> (N, 2048) pool3 features (float64)."""

    num_features = NUM_FEATURES  # read by torchmetrics' FrechetInceptionDistance (saves a probe forward)

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionA(288)
        self.Mixed_6b = MixedB(768, c7=128)
        self.Mixed_6c = MixedB(768, c7=160)
        self.Mixed_6d = MixedB(768, c7=160)
        self.Mixed_6e = MixedB(768, c7=192)
        self.Mixed_7a = ReductionB(768)
        self.Mixed_7b = MixedC(1280, max_pool=False)
        self.Mixed_7c = MixedC(2048, max_pool=True)
        # the 1008-way classifier is part of the published file (strict loading needs it); FID does not use it
        self.fc = nn.Linear(NUM_FEATURES, 1008)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        assert x_NCHW.shape[1:] == (3, INPUT_SIZE, INPUT_SIZE), x_NCHW.shape
        x = (x_NCHW.float() - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3), dtype=torch.float64)  # float64, the precision of the FID statistics


def weights_path(flag: str | None) -> Path:
    """The weights file named by the flag, else by $HART_INCEPTION_WEIGHTS; one clear error if neither
    names an existing file."""
    where = f"get {WEIGHTS_FILE} from {WEIGHTS_URL} (sha256 {WEIGHTS_SHA256})"
    value = flag or os.environ.get(WEIGHTS_ENV)
    if not value:
        raise ValueError(f"no Inception weights given: pass --inception-weights FILE or set {WEIGHTS_ENV}; {where}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist: put {WEIGHTS_FILE} there "
                                f"(or point --inception-weights / {WEIGHTS_ENV} at it); {where}")
    return path


def load_fid_inception(path: Path, device: torch.device) -> FIDInceptionV3:
    """The network with the weights of `path` (a state dict, loaded strictly), in eval mode on `device`."""
    net = FIDInceptionV3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, AttributeError, OSError, EOFError, pickle.UnpicklingError) as e:
        # not a state dict, or the state dict of another network
        raise ValueError(f"{path} is not the FID Inception state dict ({WEIGHTS_FILE}): "
                         f"{str(e).splitlines()[0]}") from None
    return net.to(device).eval().requires_grad_(False)
