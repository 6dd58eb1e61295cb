"""OFA's image backbone: a torchvision-style ResNet stem + stages 1-3 of Bottleneck blocks (OFA_SPEC 1.9).

Names match torchvision (conv1, bn1, layer1.0.conv1, ..., downsample.0/1), which is how OFA stores it.
Every conv -> BatchNorm (-> +residual) (-> ReLU) tail goes through `ofa_ds.kernels.resnet.batch_norm_act`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ofa_ds.kernels.resnet import batch_norm_act

OUT_CHANNELS = 1024  # stage-3 output: 4 x 256
SYNC_MODES = ("sync", "sync_node")


class BatchNorm2d(nn.Module):
    """BatchNorm2d (momentum 0.1) in one of four modes, with an optional fused residual add + ReLU.

    batch:  per-rank batch statistics, as OFA pretrains (eps 1e-5);
    sync:   statistics combined over all data-parallel ranks before normalising (`sync_group`, set by the
            training engine under tensor parallelism; else the world); eps 1e-3 as OFA's --sync-bn;
    sync_node: as sync, over the data-parallel ranks of one node (`sync_group`, set by the training engine);
    frozen: running statistics and a fixed affine (weight and bias are buffers), in training too.
    """

    # Buffers DeepSpeed keeps in fp32 when zero.Init builds a bf16/fp16 model (its transformers-style list): running
    # statistics updated in bf16 lose the 0.1 x (batch - running) steps near 1.0 and stall there.
    _keep_in_fp32_modules_strict = ("running_mean", "running_var", "weight", "bias")

    def __init__(self, channels: int, mode: str = "batch"):
        super().__init__()
        self.mode = mode
        self.eps = 1e-3 if mode in SYNC_MODES else 1e-5
        self.sync_group = None
        if mode == "frozen":
            self.register_buffer("weight", torch.ones(channels))
            self.register_buffer("bias", torch.zeros(channels))
        else:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x, residual=None, relu: bool = False):
        training = self.training and self.mode != "frozen"
        if training:
            self.num_batches_tracked.add_(1)
        group = None
        if training and self.mode in SYNC_MODES and dist.is_available() and dist.is_initialized():
            group = self.sync_group or (dist.group.WORLD if self.mode == "sync" else None)
            if group is None:
                raise RuntimeError("bn_mode sync_node: no node group set (the training engine sets sync_group)")
        return batch_norm_act(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=training,
            momentum=0.1,
            eps=self.eps,
            residual=residual,
            relu=relu,
            sync_group=group,
        )


class Conv2d(nn.Conv2d):
    """Bias-free conv with Kaiming-normal (fan_out, ReLU) init in reset_parameters (zero.Init-safe)."""

    def reset_parameters(self):
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")


def conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(cin, cout, k, stride, k // 2, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, bn_mode: str):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv(cin, width, 1), BatchNorm2d(width, bn_mode)
        self.conv2, self.bn2 = conv(width, width, 3, stride), BatchNorm2d(width, bn_mode)
        self.conv3, self.bn3 = conv(width, cout, 1), BatchNorm2d(cout, bn_mode)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv(cin, cout, 1, stride), BatchNorm2d(cout, bn_mode))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x), relu=True)
        out = self.bn2(self.conv2(out), relu=True)
        return self.bn3(self.conv3(out), residual=identity, relu=True)


class ResNet(nn.Module):
    """(B, 3, R, R) in [-1, 1] -> (B, 1024, R/16, R/16)."""

    def __init__(self, layers: tuple[int, int, int], bn_mode: str = "batch"):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 64, 7, 2), BatchNorm2d(64, bn_mode)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256))):
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (b == 0 and i > 0) else 1, bn_mode))
                cin = width * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        # cuDNN convolutions and the fused BN kernels are fastest channels-last. Not on the CPU: there the layout does
        # not choose the convolution backend (torch runs 1x1 stride-1 convolutions of fewer than 16 images on one
        # thread as _slow_conv2d either way) and fp32 forward + backward measured no faster channels-last.
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.bn1(self.conv1(x), relu=True))
        return self.layer3(self.layer2(self.layer1(x)))
