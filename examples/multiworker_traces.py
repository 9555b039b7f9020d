"""layer_traces on two worker processes (MultiWorkerMirroredStrategy over localhost),
compared with the same estimate on one device.

    python examples/multiworker_traces.py            # launches both workers itself

Each worker gets TF_CONFIG naming both workers on 127.0.0.1; both hold the same global
batch, take their replica's shard, and the contractions are all-reduced. Prints the
largest relative difference of the per-probe samples against one process.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def build_model():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((5,), dtype="float64")
    h = keras.layers.Dense(8, activation="tanh", dtype="float64", name="hidden")(inp)
    out = keras.layers.Dense(3, dtype="float64", name="head")(h)
    return keras.Model(inp, out)


def batch():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.normal(size=(13, 5)), rng.integers(0, 3, size=13)


def loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


def worker(weights_path, out_path):
    import numpy as np
    import tensorflow as tf

    import keras_hesstrace as kh

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model()
    with np.load(weights_path) as w:
        model.set_weights([w[f"w{i}"] for i in range(len(w.files))])
    x, y = batch()
    result = kh.layer_traces(model, x, y, num_probes=4, seed=3, loss=loss())
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with open(f"{out_path}.{task}", "w") as f:
        json.dump({"replicas": strategy.num_replicas_in_sync, "samples": result.samples.tolist(),
                   "groups": list(result.groups)}, f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    import numpy as np

    import keras_hesstrace as kh

    model = build_model()
    x, y = batch()
    single = kh.layer_traces(model, x, y, num_probes=4, seed=3, loss=loss())
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, **{f"w{i}": w for i, w in enumerate(model.get_weights())})
        out = os.path.join(tmp, "result.json")
        cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
        procs = []
        for index in range(2):
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                       PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", weights, out], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=300)[0] for p in procs]
        if any(p.returncode for p in procs):
            print("\n".join(l[-2000:] for l in logs))
            raise SystemExit("a worker failed")
        results = []
        for index in range(2):
            with open(f"{out}.{index}") as f:
                results.append(json.load(f))
    ref = single.samples
    for index, r in enumerate(results):
        diff = float(np.max(np.abs(np.array(r["samples"]) - ref)) / np.max(np.abs(ref)))
        print(f"worker {index}: {r['replicas']} replicas in sync, groups {r['groups']}, "
              f"max relative difference to one device {diff:.2e}")
    print("RESULT " + json.dumps({"replicas": results[0]["replicas"], "max_rel_diff": max(
        float(np.max(np.abs(np.array(r["samples"]) - ref)) / np.max(np.abs(ref))) for r in results)}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
