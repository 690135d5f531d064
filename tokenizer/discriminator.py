"""PatchGAN discriminator: taming-transformers' `NLayerDiscriminator`, as shipped in HART's tokenizer checkpoint.

Keys are `main.{i}.*` of one nn.Sequential; for n_layers=3 the parameterised entries are
0 (conv 3->64, bias), 2 (conv 64->128, no bias), 3 (BatchNorm), 5 (conv 128->256), 6 (BN), 8 (conv 256->512,
stride 1), 9 (BN), 11 (conv 512->1, bias); LeakyReLU(0.2) in between. Output: one logit per 70x70 patch.
Initialisation is taming's `weights_init` (conv weight N(0, 0.02), BN weight N(1, 0.02), BN bias 0).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNorm2dFP32(nn.BatchNorm2d):
    """BatchNorm2d that normalises in fp32 whatever dtype its input and weights have (bf16 under DeepSpeed's
    bf16), with its running statistics kept in fp32; output in the input's dtype. Same state-dict keys."""

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or not self.track_running_stats
        out = F.batch_norm(x_BChw.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                           use_batch_stats, self.momentum, self.eps)
        return out.to(x_BChw.dtype)


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            mult_prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last feature conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * mult_prev, ndf * mult, kw, stride=stride, padding=padw, bias=False),
                BatchNorm2dFP32(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw))
        self.main = nn.Sequential(*layers)
        self.apply(_taming_init)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.main(img_B3HW)


def _taming_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)  # conv biases keep PyTorch's default init, as in taming
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
