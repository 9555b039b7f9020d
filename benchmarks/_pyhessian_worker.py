"""PyTorch/PyHessian side of benchmarks/vs_pyhessian.py (runs in benchmarks/.venv-torch).

Builds the PyTorch twin of the Keras network (_torch_resnets.py: ResNet-20 or ResNet-18 with
TensorFlow's padding), loads the Keras side's weights, the batch and the fixed vector v from
the .npz files it wrote, and measures with PyHessian's own code paths (one process, the
threads given):

  float32 (timed, medians of reps after warmup):
  - the loss; one gradient (forward + backward);
  - PyHessian's constructor (forward + create_graph backward), then one HVP on its retained
    graph, and one HVP with the graph rebuilt (plain PyTorch); H v is written to an .npz;
  - top-k eigenvalues: `hessian.eigenvalues(top_n=k, maxIter=100, tol=1e-3)` (its defaults),
    seconds incl. its constructor, HVPs counted by wrapping pyhessian's hessian_vector_product;
  - the full trace: `hessian.trace(maxIter=100, tol=1e-3)` (its defaults), incl. the
    constructor; its samples are returned (the caller computes their standard error);
  - every layer's trace (given per-layer probe counts M_l, keyed by Keras layer path): for each
    layer, freeze the others, build `hessian` and run `trace(maxIter=M_l, tol=-inf)`.
  float64 (values only, with float64 in the spec): loss, H v, the eigenvalues and trace as above.

Prints one JSON line "RESULT {...}".
"""

import json
import sys
import time

import numpy as np
import torch
from torch import nn

import pyhessian  # noqa: F401  (imports pyhessian.hessian; its __init__ shadows the module pyhessian.hessian with the class)
from _timing import timed
from _torch_resnets import build, layers, named_params

ph = sys.modules["pyhessian.hessian"]
HVPS = [0]
_hvp = ph.hessian_vector_product


def _counted_hvp(*args, **kwargs):
    HVPS[0] += 1
    return _hvp(*args, **kwargs)


ph.hessian_vector_product = _counted_hvp  # PyHessian's eigenvalues() and trace() call it by this name


def _stats(samples):
    s = np.asarray(samples, dtype=np.float64)
    se = float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan")
    return {"value": float(s.mean()), "stderr": se, "probes": len(s)}


def measure(spec, dtype, timings):
    torch.set_default_dtype(dtype)  # PyHessian draws its eigenvalue start vectors with torch.randn
    data = np.load(spec["batch"])
    x = torch.from_numpy(np.transpose(data["x"], (0, 3, 1, 2)).copy()).to(dtype)
    y = torch.from_numpy(data["y"]).long()
    model = build(spec["arch"], spec["weights"], dtype)
    criterion = nn.CrossEntropyLoss()
    named = named_params(model)
    params = [p for _, p in named]
    vec = np.load(spec["vector"])
    v = []
    for k, p in named:
        a = vec[k]
        a = np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else (a.T if a.ndim == 2 else a)
        v.append(torch.from_numpy(np.ascontiguousarray(a)).to(dtype))
    out = {"params": sum(p.numel() for p in params)}
    with torch.no_grad():
        out["loss"] = float(criterion(model(x), y))

    def gradient():
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()

    def fresh_hvp():
        loss = criterion(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(grads, params, grad_outputs=v)

    if timings:
        out["gradient_s"], _ = timed(gradient, spec["warmup"], spec["reps"])
        out["hvp_fresh_s"], _ = timed(fresh_hvp, spec["warmup"], spec["reps"])
    hv = fresh_hvp()
    hv_np = {}
    for (k, _), g in zip(named, hv):
        a = g.detach().numpy()
        hv_np[k] = np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else (a.T if a.ndim == 2 else a)

    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    hess = ph.hessian(model, criterion, data=(x, y), cuda=False)
    out["constructor_s"] = time.perf_counter() - start
    # PyHessian's params are model.parameters() in module-registration order = named_params' order
    assert all(a is b for a, b in zip(hess.params, params)) and len(hess.params) == len(params)
    if timings:
        out["hvp_retained_s"], _ = timed(lambda: torch.autograd.grad(hess.gradsH, hess.params, grad_outputs=v, retain_graph=True),
                                         spec["warmup"], spec["reps"])

    torch.manual_seed(spec["seed"])
    HVPS[0] = 0
    start = time.perf_counter()
    eigenvalues, _ = hess.eigenvalues(maxIter=100, tol=1e-3, top_n=spec["k"])
    out["eigen"] = {"values": [float(e) for e in eigenvalues], "hvps": HVPS[0],
                    "seconds": time.perf_counter() - start + out["constructor_s"]}

    torch.manual_seed(spec["seed"])
    HVPS[0] = 0
    start = time.perf_counter()
    samples = hess.trace(maxIter=100, tol=1e-3)
    out["trace"] = dict(_stats(samples), samples=[float(s) for s in samples], hvps=HVPS[0],
                        seconds=time.perf_counter() - start + out["constructor_s"])
    hess = None  # free its graph before the per-layer runs

    counts = spec.get("layer_counts") if timings else None
    if counts:
        per_layer, start = {}, time.perf_counter()
        mods = layers(model)
        for i, layer in enumerate(mods):
            own = set(id(p) for p in layer.parameters(recurse=False))
            for p in model.parameters():
                p.requires_grad_(id(p) in own)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(spec["seed"] + 1 + i)
            hl = ph.hessian(model, criterion, data=(x, y), cuda=False)
            per_layer[layer.keras_path] = _stats(hl.trace(maxIter=int(counts[layer.keras_path]), tol=float("-inf")))
            del hl
            print(f"  pyhessian layer {i + 1}/{len(mods)}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        out["layers"] = {"seconds": time.perf_counter() - start, "hvps": int(sum(counts.values())), "traces": per_layer}
        for p in model.parameters():
            p.requires_grad_(True)
    return out, hv_np


def main(spec):
    torch.set_num_threads(spec["threads"])
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    arrays = {}
    for name, dtype, timings in (("float32", torch.float32, True), ("float64", torch.float64, False)):
        if name == "float64" and not spec["float64"]:
            continue
        print(f"  pyhessian side, {name} ...", file=sys.stderr, flush=True)
        result[name], hv = measure(spec, dtype, timings)
        arrays.update({f"{name}:{k}": a for k, a in hv.items()})
    np.savez(spec["hv_out"], **arrays)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
