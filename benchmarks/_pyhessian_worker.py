"""PyTorch/PyHessian side of benchmarks/vs_pyhessian.py (runs in benchmarks/.venv-torch).

Reads the batch from an .npz, builds a CIFAR ResNet-18 in PyTorch (the same architecture
as keras_hesstrace.models.resnet18: 11,173,962 parameters), and times with PyHessian's
own code paths:
  - one HVP with the graph retained (what PyHessian does after its constructor);
  - the full-model trace with PyHessian's defaults (maxIter=100, tol=1e-3);
  - every layer's trace the way a PyHessian user must get it: for each layer with
    parameters, freeze the others, build a `hessian` object (forward + create_graph
    backward) and run `trace(maxIter=M, tol=-inf)` (a fixed M probes).
Prints one JSON line "RESULT {...}".
"""

import json
import sys
import time

import numpy as np
import torch
from torch import nn
from pyhessian import hessian

from _timing import timed


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = self.blocks(h)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def main(npz, threads, reps, warmup, probes, skip_layers):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = np.load(npz)
    x = torch.from_numpy(np.transpose(data["x"], (0, 3, 1, 2)).copy())
    y = torch.from_numpy(data["y"]).long()
    model = ResNet18().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 11_173_962, n_params
    criterion = nn.CrossEntropyLoss()
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "params": n_params}

    def gradient():
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()

    out["gradient_s"], _ = timed(gradient, warmup, reps)

    start = time.perf_counter()
    h = hessian(model, criterion, data=(x, y), cuda=False)
    out["constructor_s"] = time.perf_counter() - start
    v = [torch.randint_like(p, high=2) * 2 - 1 for p in h.params]
    out["hvp_retained_s"], _ = timed(lambda: torch.autograd.grad(h.gradsH, h.params, grad_outputs=v, retain_graph=True), warmup, reps)

    def fresh_hvp():
        model.zero_grad(set_to_none=True)
        params = [p for p in model.parameters()]
        loss = criterion(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(grads, params, grad_outputs=v)

    out["hvp_fresh_s"], _ = timed(fresh_hvp, warmup, reps)

    np.random.seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    samples = h.trace(maxIter=100, tol=1e-3)
    out["trace_default_s"] = time.perf_counter() - start + out["constructor_s"]
    out["trace_default_probes"] = len(samples)
    out["trace_default_value"] = float(np.mean(samples))
    del h

    if not skip_layers:
        layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        out["layers"] = len(layers)
        start = time.perf_counter()
        traces = []
        for i, layer in enumerate(layers):
            own = set(id(p) for p in layer.parameters(recurse=False))
            for p in model.parameters():
                p.requires_grad_(id(p) in own)
            model.zero_grad(set_to_none=True)
            hl = hessian(model, criterion, data=(x, y), cuda=False)
            traces.append(float(np.mean(hl.trace(maxIter=probes, tol=float("-inf")))))
            del hl
            print(f"  pyhessian layer {i + 1}/{len(layers)}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        out["layerwise_s"] = time.perf_counter() - start
        out["layerwise_probes"] = probes
        for p in model.parameters():
            p.requires_grad_(True)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    main(**args)
