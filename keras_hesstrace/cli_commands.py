"""The analysis commands of ``keras-hesstrace``: estimate, eigen, density, landscape.

Each ``run_*(args)`` takes the parsed arguments (``cli.build_parser``), reads the model,
data and loss (``cli_inputs``), calls the package's estimator and prints and writes its
results; it returns the exit code. Problems with the inputs are ``CLIError``.
"""

import os

from keras_hesstrace.cli_inputs import CLIError, first_line, fit_data_to_model, load_data, load_model, resolve_cli_loss, writable_folder


def checkselected_groups(model, args):
    """--block names groups of the model (checked before any Hessian-vector product)."""
    if not args.block:
        return
    from keras_hesstrace.spectrum import block_indices

    try:
        block_indices(model, list(args.block), args.by)
    except ValueError as err:
        raise CLIError(f"--block {list(args.block)}: {first_line(err)}") from None


def prepare(args):
    """Import --import modules, load model and data, check they fit; returns (model, data, y, loss, meta)."""
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.out:
        writable_folder(args.out, "--out")
    model = load_model(args.model, args.imports)
    x, y, desc = load_data(args)
    loss = resolve_cli_loss(model, args.loss, args.from_logits)
    checkselected_groups(model, args)
    x = fit_data_to_model(model, x)
    try:
        out = model(x[:2], training=False)
    except Exception as err:
        raise CLIError(f"the data (examples of shape {tuple(x.shape[1:])}) does not fit the model: {first_line(err)}") from None
    from keras_hesstrace.losses import make_objective

    import tensorflow as tf

    try:
        make_objective(model, loss)(tf.convert_to_tensor(x[:2]), tf.convert_to_tensor(y[:2]))
    except Exception as err:
        shapes = tf.nest.map_structure(lambda t: tuple(t.shape[1:]), out)
        raise CLIError(
            f"the loss cannot be computed on this data (labels of shape {tuple(y.shape[1:])}, outputs of shape "
            f"{shapes}): {first_line(err)}"
        ) from None
    batch = args.batch_size or len(x)
    if batch >= len(x):
        data, labels = x, y
    else:
        data, labels = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch), None
    loss_name = args.loss or getattr(getattr(model, "loss", None), "name", None) or str(getattr(model, "loss", None))
    meta = {
        "model": os.path.abspath(args.model),
        "data": desc,
        "num_examples": int(len(x)),
        "batch_size": int(min(batch, len(x))),
        "loss": loss_name + (" (from logits)" if args.from_logits else ""),
        "by": args.by,
        "block": args.block,
        "seed": args.seed,
        "mode": args.mode,
        "imports": list(args.imports or []),
    }
    print(f"model {args.model} ({model.count_params():,} parameters); data {desc}: {len(x)} examples in "
          f"batches of {meta['batch_size']}; loss {meta['loss']}; HVP mode {args.mode}")
    return model, data, labels, loss, meta


def out_dir(args):
    """The --out folder (made and checked writable by ``prepare``), or None."""
    return args.out or None


def write_json(path, payload):
    """``payload`` as strict JSON (NaN as null), written atomically."""
    from keras_hesstrace.files import atomic_write_json

    atomic_write_json(path, payload)


def selected_groups(args):
    return None if not args.block else list(args.block)


def with_total(frame, result, num_params=None):
    """``frame`` (``GroupTraces.to_frame()``) with a last row ``total``: the whole-model trace and its stderr."""
    import numpy as np
    import pandas as pd

    row = {column: np.nan for column in frame.columns}
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = abs(result.total_stderr / result.total) if result.total else float("nan")
    if getattr(result, "rel_stderr_target", None) is not None:
        row.update(rel_stderr_target=result.rel_stderr_target, target_met=bool(result.total_target_met))
    row.update(trace=result.total, stderr=result.total_stderr, rel_stderr=rel,
               num_params=int(np.sum(result.group_sizes)) if num_params is None else int(num_params), num_probes=len(result.total_samples),
               gradient_norm=getattr(result, "gradient_norm", np.nan))
    total = pd.DataFrame([{c: row[c] for c in frame.columns}], index=pd.Index(["total"], name=frame.index.name))
    return pd.concat([frame, total.astype(frame.dtypes.to_dict(), errors="ignore")])


def run_estimate(args):
    import math

    import keras_hesstrace as kh
    from keras_hesstrace import plots

    model, data, labels, loss, meta = prepare(args)
    target = {} if args.rel_stderr is None else {"rel_stderr": args.rel_stderr, "max_probes": args.max_probes or 1000}
    result = kh.layer_traces(model, data, labels, num_probes=args.num_probes, by=args.by, groups=selected_groups(args),
                             seed=args.seed, loss=loss, mode=args.mode, verbose=1, scheme=args.scheme, **target)
    frame = result.to_frame()
    print()
    print(result)
    out = out_dir(args)
    if out:
        trainable = sum(int(math.prod(v.shape)) for v in model.trainable_variables)
        with_total(frame, result, trainable).to_csv(os.path.join(out, "traces.csv"))
        write_json(os.path.join(out, "estimate.json"), {
            **meta, "command": "estimate", "mode_used": getattr(result, "mode", args.mode),
            "num_probes": result.num_probes, "loss_value": result.loss,
            "total_trace": result.total, "total_stderr": result.total_stderr,
            "rel_stderr_target": args.rel_stderr, "scheme": args.scheme, "hvps_drawn": result.num_hvps_drawn,
            "groups_table": frame.reset_index().to_dict(orient="records"),
        })
        plots.plot_traces(frame, os.path.join(out, "traces.png"), total=result.total, total_stderr=result.total_stderr, by=args.by,
                          caption=plots.caption_from_meta(meta, probes=result.num_probes, mode_used=getattr(result, "mode", None)))
        print(f"wrote traces.csv, estimate.json, traces.png to {out}")
    return 0


def run_eigen(args):
    from keras_hesstrace import plots, spectrum

    model, data, labels, loss, meta = prepare(args)
    result = spectrum.top_eigenvalues(
        model, data, labels, k=args.k, max_iter=args.max_iter, tol=args.tol, method=args.method, which=args.which,
        loss=loss, groups=selected_groups(args), by=args.by, seed=args.seed, mode=args.mode, verbose=1,
    )
    print()
    print(result)
    out = out_dir(args)
    if out:
        result.to_frame().to_csv(os.path.join(out, "eigenvalues.csv"))
        write_json(os.path.join(out, "eigen.json"), {
            **meta, "command": "eigen", "method": result.method, "which": result.which, "tol": args.tol,
            "eigenvalues": result.eigenvalues, "residuals": result.residuals, "converged": result.converged,
            "num_hvps": result.num_hvps, "dimension": result.dimension, "loss_value": result.loss,
        })
        plots.plot_eigenvalues(result, os.path.join(out, "eigenvalues.png"), caption=plots.caption_from_meta(
            meta, k=args.k, method=result.method, which=result.which, tol=args.tol, max_iter=args.max_iter))
        print(f"wrote eigenvalues.csv, eigen.json, eigenvalues.png to {out}")
    return 0


def run_density(args):
    import pandas as pd

    from keras_hesstrace import plots, spectrum

    model, data, labels, loss, meta = prepare(args)
    result = spectrum.spectral_density(
        model, data, labels, num_runs=args.num_runs, lanczos_steps=args.lanczos_steps, sigma=args.sigma,
        loss=loss, groups=selected_groups(args), by=args.by, seed=args.seed, mode=args.mode, verbose=1,
    )
    print()
    print(result)
    out = out_dir(args)
    if out:
        result.to_frame().to_csv(os.path.join(out, "nodes.csv"), index=False)
        pd.DataFrame({"eigenvalue": result.grid, "density": result.density}).to_csv(os.path.join(out, "density.csv"), index=False)
        write_json(os.path.join(out, "density.json"), {
            **meta, "command": "density", "num_runs": result.num_runs, "lanczos_steps": result.lanczos_steps,
            "sigma": result.sigma, "num_hvps": result.num_hvps, "dimension": result.dimension,
            "moments": {str(k): result.moment(k) for k in (1, 2)}, "notes": list(result.notes),
            "nodes": result.nodes, "weights": result.weights, "loss_value": result.loss,
        })
        plots.plot_density(result, os.path.join(out, "density.png"), caption=plots.caption_from_meta(
            meta, runs=result.num_runs, lanczos_steps=result.lanczos_steps, sigma=f"{result.sigma:.3g}"))
        print(f"wrote nodes.csv, density.csv, density.json, density.png to {out}")
    return 0


def run_landscape(args):
    from keras_hesstrace import landscape, plots

    model, data, labels, loss, meta = prepare(args)
    result = landscape.loss_landscape(
        model, data, labels, directions=args.directions, grid=args.grid, span=args.span, loss=loss,
        groups=selected_groups(args), by=args.by, seed=args.seed, mode=args.mode, verbose=1,
    )
    print()
    print(result)
    out = out_dir(args)
    if out:
        result.to_frame().to_csv(os.path.join(out, "landscape.csv"), index=False)
        write_json(os.path.join(out, "landscape.json"), {
            **meta, "command": "landscape", "directions": args.directions, "kind": result.kind,
            "coordinates": list(result.coordinates), "losses": result.losses, "origin_loss": result.origin_loss,
            "eigenvalues": result.eigenvalues,
        })
        plots.plot_landscape(result, os.path.join(out, "landscape.png"), caption=plots.caption_from_meta(
            meta, directions=args.directions, grid=args.grid, span=args.span))
        print(f"wrote landscape.csv, landscape.json, landscape.png to {out}")
    return 0
