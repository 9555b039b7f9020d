"""PyTorch twins of keras_hesstrace.models.cifar_resnet(20) and .resnet18 (used by _pyhessian_worker.py).

Same layers, same order, same arithmetic as the Keras models (keras_hesstrace/models/resnet.py):
convolutions without bias and with TensorFlow's padding="same" (for a stride-2 3x3
convolution on an even input TensorFlow pads 0 rows/columns at the top/left and 1 at the
bottom/right, so the padding is computed as TensorFlow does and applied with F.pad before an
unpadded convolution), BatchNorm with eps 1e-5 (run in eval mode: moving statistics), a
projection shortcut (1x1 conv + BN) where the shape changes, global average pool, Linear head.

Every parameterised module carries the Keras layer path it mirrors (``module.keras_path``:
"stem/conv", "stage2/block1/shortcut_bn", "head"), and ``load_keras_weights`` reads the .npz
the Keras side writes, keyed "<layer path>/<variable name>" (kernels HWIO -> OIHW, the Dense
kernel transposed; BN gamma/beta/moving_mean/moving_variance).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCHS = {  # blocks per stage, widths, trainable parameters for 10 classes
    "resnet20": ((3, 3, 3), (16, 32, 64), 272_474),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512), 11_173_962),
}


def _same_pad(size, kernel, stride):
    """TensorFlow's padding="same": (before, after) for one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d without bias whose padding is TensorFlow's "same" (asymmetric where TF's is)."""

    def __init__(self, cin, cout, kernel, stride, path):
        super().__init__(cin, cout, kernel, stride, padding=0, bias=False)
        self.keras_path = path

    def forward(self, x):
        (t, b), (l, r) = (_same_pad(x.shape[i], self.kernel_size[0], self.stride[0]) for i in (2, 3))
        if t or b or l or r:
            x = F.pad(x, (l, r, t, b))
        return F.conv2d(x, self.weight, None, self.stride)


def _bn(channels, path):
    m = nn.BatchNorm2d(channels, eps=1e-5)
    m.keras_path = path
    return m


class Block(nn.Module):
    def __init__(self, prefix, cin, cout, stride):
        super().__init__()
        self.conv1 = SameConv2d(cin, cout, 3, stride, f"{prefix}/conv1")
        self.bn1 = _bn(cout, f"{prefix}/bn1")
        self.conv2 = SameConv2d(cout, cout, 3, 1, f"{prefix}/conv2")
        self.bn2 = _bn(cout, f"{prefix}/bn2")
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(SameConv2d(cin, cout, 1, stride, f"{prefix}/shortcut_conv"),
                                          _bn(cout, f"{prefix}/shortcut_bn"))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, arch, num_classes=10):
        super().__init__()
        blocks_per_stage, widths, self.expected_params = ARCHS[arch]
        self.conv = SameConv2d(3, widths[0], 3, 1, "stem/conv")
        self.bn = _bn(widths[0], "stem/bn")
        blocks, cin = [], widths[0]
        for s, (n, width) in enumerate(zip(blocks_per_stage, widths), start=1):
            for b in range(1, n + 1):
                blocks.append(Block(f"stage{s}/block{b}", cin, width, 2 if (b == 1 and s > 1) else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        self.head.keras_path = "head"

    def forward(self, x):
        h = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def layers(model):
    """The modules that own parameters, in model order (= the Keras layer groups' order)."""
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def named_params(model):
    """[(keras variable path, parameter)] in model order, e.g. ("stem/bn/gamma", bn.weight)."""
    names = {"weight": "kernel", "bias": "bias"}
    out = []
    for m in layers(model):
        for name, p in m.named_parameters(recurse=False):
            key = ({"weight": "gamma", "bias": "beta"} if isinstance(m, nn.BatchNorm2d) else names)[name]
            out.append((f"{m.keras_path}/{key}", p))
    return out


def load_keras_weights(model, npz):
    """Copy the Keras weights in ``npz`` (keyed "<layer path>/<variable>") into ``model``."""
    w = np.load(npz)
    used = set()
    with torch.no_grad():
        for m in layers(model):
            p = m.keras_path
            if isinstance(m, nn.Conv2d):
                pairs = [(m.weight, np.transpose(w[f"{p}/kernel"], (3, 2, 0, 1)), f"{p}/kernel")]
            elif isinstance(m, nn.BatchNorm2d):
                pairs = [(m.weight, w[f"{p}/gamma"], f"{p}/gamma"), (m.bias, w[f"{p}/beta"], f"{p}/beta"),
                         (m.running_mean, w[f"{p}/moving_mean"], f"{p}/moving_mean"),
                         (m.running_var, w[f"{p}/moving_variance"], f"{p}/moving_variance")]
            else:
                pairs = [(m.weight, w[f"{p}/kernel"].T, f"{p}/kernel"), (m.bias, w[f"{p}/bias"], f"{p}/bias")]
            for target, value, key in pairs:
                assert tuple(target.shape) == value.shape, (key, tuple(target.shape), value.shape)
                target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))
                used.add(key)
    unused = set(w.files) - used
    assert not unused, f"weights not loaded: {sorted(unused)[:5]}"


def build(arch, npz, dtype=torch.float32):
    """The twin of the Keras model ``arch`` with its weights from ``npz``, in eval mode."""
    model = ResNet(arch).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    assert n == model.expected_params, (arch, n, model.expected_params)
    load_keras_weights(model, npz)
    return model.eval()
