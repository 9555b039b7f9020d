"""keras-hesstrace side of benchmarks/vs_pyhessian.py (runs in the main process, .venv).

``KerasSide`` builds the network, sets its BatchNorm moving statistics from data (as
layer_trace_schemes.setup does: a fresh network's mean 0 / variance 1 saturate the softmax),
writes the weights (keyed "<layer path>/<variable name>", Keras layouts), the batch and a
fixed Gaussian vector v to .npz files for the PyTorch side, and measures in two phases:

  before the PyTorch side runs (``first``): the loss, one gradient, one HVP and H v; a converged
  reference for the top-k eigenvalues (Lanczos, tol 1e-8); every layer's trace to the target
  relative standard error with scheme="restricted" (whose per-layer probe counts the PyTorch
  side reuses) and scheme="auto"; in float64 (a float64 copy of the network with the same
  weights) the loss, H v and the reference eigenvalues;
  after it (``second``, given PyHessian's results): top-k eigenvalues with Lanczos and with
  power iteration at the largest tol whose error is at most PyHessian's; the full trace with
  hessian_trace(tol = PyHessian's relative standard error, max_iter=100); the float64 trace.
"""

import time
import warnings

import numpy as np

EIGEN_TOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def keras_layers(model, prefix=""):
    """(layer path, layer) of every leaf layer with weights, in model order."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from keras_layers(layer, f"{prefix}{layer.name}/")
        elif layer.weights:
            yield f"{prefix}{layer.name}", layer


def _new_model(arch):
    import keras

    from keras_hesstrace import models

    model = models.cifar_resnet(20) if arch == "resnet20" else models.resnet18(num_classes=10, input_shape=(32, 32, 3))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def build(arch, batch, seed=0):
    """The float32 network with data-set BN statistics, and one random batch (x, y)."""
    from layer_trace_schemes import setup

    return setup(batch, seed, arch)


def rel_error(a, b):
    """max_i |a_i - b_i| / |b_i| for the first len(b) entries (NaN where a has fewer)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < len(b):
        return float("nan")
    return float(np.max(np.abs(a[: len(b)] - b) / np.abs(b)))


def by_magnitude(values):
    return sorted(values, key=lambda e: -abs(e))


class KerasSide:
    def __init__(self, args, weights_npz, batch_npz, vector_npz):
        import keras
        import tensorflow as tf

        self.args, self.kh = args, __import__("keras_hesstrace")
        model, x, y = build(args.arch, args.batch)
        self.weights = {f"{p}/{v.name}": np.asarray(v.numpy()) for p, layer in keras_layers(model) for v in layer.weights}
        np.savez(weights_npz, **self.weights)
        np.savez(batch_npz, x=x, y=y)
        rng = np.random.default_rng(1)
        self.keys = self._keys(model)
        self.v = {k: rng.normal(size=model.trainable_variables[i].shape) for i, k in enumerate(self.keys)}
        np.savez(vector_npz, **self.v)
        self.models = {"float32": model}
        self.data = {"float32": (tf.constant(x), tf.constant(y))}
        if args.float64:
            previous, policy = keras.config.floatx(), keras.config.dtype_policy()
            keras.config.set_floatx("float64")  # so that compile() builds the loss in float64 too
            keras.config.set_dtype_policy("float64")  # the layers take the global policy, not floatx
            try:
                m64 = _new_model(args.arch)
            finally:
                keras.config.set_floatx(previous)
                keras.config.set_dtype_policy(policy)
            assert variables_dtype(m64) == "float64"
            index = {id(v): f"{p}/{v.name}" for p, layer in keras_layers(m64) for v in layer.weights}
            for v in m64.weights:
                v.assign(self.weights[index[id(v)]].astype("float64"))
            self.models["float64"] = m64
            self.data["float64"] = (tf.constant(x.astype("float64")), tf.constant(y))
        self.out = {"tf": tf.__version__, "keras": keras.__version__,
                    "params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
                    "num_layers": len(self.kh.layer_groups(model))}

    @staticmethod
    def _keys(model):
        index = {id(v): f"{p}/{v.name}" for p, layer in keras_layers(model) for v in layer.trainable_weights}
        return [index[id(v)] for v in model.trainable_variables]

    def _values(self, name):
        import tensorflow as tf

        from _timing import timed
        from keras_hesstrace.losses import make_objective

        a, kh = self.args, self.kh
        model, (x, y) = self.models[name], self.data[name]
        variables, dtype = model.trainable_variables, variables_dtype(model)
        objective = make_objective(model)
        out = {"loss": float(objective(x, y))}
        v = [self.v[k].astype(dtype) for k in self.keys]
        hv = kh.hvp(model, x, y, v)  # compiles, outside the timings
        if name == "float32":
            @tf.function
            def grad(x, y):
                with tf.GradientTape() as tape:
                    loss = objective(x, y)
                return tape.gradient(loss, variables)

            out["gradient_s"], _ = timed(lambda: [g.numpy() for g in grad(x, y)], a.warmup, a.reps)
            out["hvp_s"], _ = timed(lambda: [h.numpy() for h in kh.hvp(model, x, y, v)], a.warmup, a.reps)
        start = time.perf_counter()
        ref = kh.top_eigenvalues(model, x, y, k=a.k, method="lanczos", tol=1e-8, max_iter=300, seed=0)
        out["eigen_reference"] = {"values": ref.eigenvalues.tolist(), "hvps": int(ref.num_hvps),
                                  "converged": bool(ref.converged.all()), "residuals": ref.residuals.tolist(),
                                  "seconds": time.perf_counter() - start}
        kh.hessian_trace(model, x, y, max_iter=2, tol=0, seed=0)  # compile, outside the timings
        return out, {k: np.asarray(h) for k, h in zip(self.keys, hv)}

    def first(self):
        """Everything that does not need PyHessian's results; returns our H v by precision."""
        hv = {}
        for name in self.models:
            self.out[name], hv[name] = self._values(name)
        if not self.args.skip_layers:
            self.out["layers"] = self._layers()
        return hv

    def _layers(self):
        a, kh = self.args, self.kh
        model, (x, y) = self.models["float32"], self.data["float32"]
        kh.layer_traces(model, x, y, num_probes=2, seed=99, scheme="restricted")  # compile, outside the timings
        runs, self.layer_runs = {}, {}
        for scheme in ("restricted", "auto"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                r = kh.layer_traces(model, x, y, num_probes=10, seed=2, rel_stderr=a.rel_stderr, max_probes=2000,
                                    scheme=scheme, verbose=0)
                seconds = time.perf_counter() - start
            self.layer_runs[scheme] = r
            counts = r.probe_counts if r.probe_counts is not None else np.full(len(r.groups), r.num_probes)
            runs[scheme] = {"seconds": seconds, "hvps": int(r.num_hvps_drawn), "groups_met": int(r.target_met.sum()),
                            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
                            "traces": {g: {"value": float(t), "stderr": float(s), "probes": int(c)}
                                       for g, t, s, c in zip(r.groups, r.trace, r.stderr, counts)},
                            "table": r.to_frame().reset_index().to_dict(orient="records")}
            print(f"  ours, every layer's trace, scheme={scheme}: {seconds:.1f} s, {r.num_hvps_drawn} HVPs", flush=True)
        return runs

    def layer_counts(self):
        """Each layer's probe count in our scheme="restricted" run (for PyHessian's per-layer route)."""
        if "layers" not in self.out:
            return None
        return {g: t["probes"] for g, t in self.out["layers"]["restricted"]["traces"].items()}

    def second(self, theirs):
        """Eigenvalues and trace at PyHessian's accuracy; ``theirs``: the worker's result."""
        a, kh = self.args, self.kh
        for name in self.models:
            model, (x, y) = self.models[name], self.data[name]
            mine, other = self.out[name], theirs[name]
            ref = mine["eigen_reference"]["values"]
            target = rel_error(by_magnitude(other["eigen"]["values"]), ref)
            other["eigen"]["rel_error"] = target
            if name == "float32":
                for method in ("lanczos", "power"):
                    tries = []
                    for tol in EIGEN_TOLS:
                        with warnings.catch_warnings(record=True) as caught:  # "did not reach tol": recorded
                            warnings.simplefilter("always")
                            start = time.perf_counter()
                            r = kh.top_eigenvalues(model, x, y, k=a.k, method=method, tol=tol, max_iter=100, seed=0)
                            seconds = time.perf_counter() - start
                        tries.append({"tol": tol, "seconds": seconds, "hvps": int(r.num_hvps),
                                      "values": r.eigenvalues.tolist(), "rel_error": rel_error(r.eigenvalues, ref),
                                      "warnings": [str(w.message) for w in caught]})
                        if tries[-1]["rel_error"] <= target:
                            break
                    mine[f"eigen_{method}"] = dict(tries[-1], reached=tries[-1]["rel_error"] <= target, tries=tries)
            t = other["trace"]
            t["rel_stderr"] = abs(t["stderr"] / t["value"])
            tol = t["rel_stderr"] if np.isfinite(t["rel_stderr"]) and t["rel_stderr"] > 0 else 1e-3
            start = time.perf_counter()
            r = kh.hessian_trace(model, x, y, tol=tol, max_iter=100, seed=0)
            mine["trace"] = {"value": float(r.trace), "stderr": float(r.stderr), "hvps": int(r.num_hvps), "tol": tol,
                             "converged": bool(r.converged), "seconds": time.perf_counter() - start}
            mine["trace"]["z_vs_pyhessian"] = float((r.trace - t["value"]) / np.hypot(r.stderr, t["stderr"]))
        return self.out


def variables_dtype(model):
    return "float64" if any(v.dtype == "float64" for v in model.trainable_variables) else "float32"
