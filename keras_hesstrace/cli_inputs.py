"""What the analysis commands of ``keras-hesstrace`` read: the user's modules, the model, the data, the loss.

Every problem with them is a :class:`CLIError`: one line that names the flag or file, printed
without a traceback, exit code 2.
"""

import importlib
import importlib.util
import os
import re
import sys

from keras_hesstrace.errors import error_summary


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


first_line = error_summary  # the CLI's name for it


def writable_folder(path, flag):
    """Make the folder ``path`` if needed and check a file can be written in it.

    Checked before any long computation, so that results are never computed and then
    lost; ``CLIError`` naming ``flag`` and the path otherwise (e.g. a read-only file system).
    """
    probe = os.path.join(path, f".keras-hesstrace-write-check{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot write there ({e.strerror or e}).") from None
    return path


# ======================================================================= --import


def _import_file(spec_text):
    """Import a .py file as a module named after the file; its folder is importable meanwhile."""
    path = os.path.abspath(os.path.expanduser(spec_text))
    if not os.path.isfile(path):
        raise CLIError(f"--import {spec_text}: file not found.")
    name = os.path.splitext(os.path.basename(path))[0]
    if not name.isidentifier():
        raise CLIError(f"--import {spec_text}: {name!r} is not a valid module name; rename the file.")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_modules(names):
    """Import the modules given with ``--import`` (registering their custom Keras objects).

    Args:
        names: dotted module names (importable from the current directory or sys.path) or
            paths to ``.py`` files; ``None`` or empty for none.

    Raises:
        CLIError: naming the module, when it cannot be found or raises while importing.
    """
    for name in names or ():
        is_file = name.endswith(".py") or os.sep in name or "/" in name
        saved_path = list(sys.path)
        if is_file:
            sys.path.insert(0, os.path.dirname(os.path.abspath(os.path.expanduser(name))))
        elif os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # a console script's sys.path lacks the working directory
        try:
            if is_file:
                _import_file(name)
            else:
                importlib.invalidate_caches()
                importlib.import_module(name)
        except CLIError:
            raise
        except ModuleNotFoundError as err:
            if is_file or err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise CLIError(f"--import {name}: importing it failed: ModuleNotFoundError: {first_line(err)}") from None
            raise CLIError(
                f"--import {name}: no module named {err.name!r}; pass a module importable from the "
                "current directory or a path to a .py file."
            ) from None
        except (Exception, SystemExit) as err:
            raise CLIError(f"--import {name}: importing it failed: {type(err).__name__}: {first_line(err)}") from None
        finally:
            sys.path[:] = saved_path


# ======================================================================= the model


_MISSING = re.compile(r"Could not locate (?:class|function) '([^']+)'")


def unregistered_objects(path):
    """Custom objects that a ``.keras`` file's config names but this process has not registered.

    Returns:
        list of (name, module) pairs, e.g. ``[("Scale", "mylayers")]``; empty when the file
        is not a ``.keras`` archive or every object is registered.
    """
    import json
    import zipfile

    import keras

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except Exception:
        return []
    found = []

    def walk(node):
        if isinstance(node, dict):
            registered, module = node.get("registered_name"), node.get("module")
            if (isinstance(registered, str) and registered
                    and str(module or "").split(".")[0] != "keras"
                    and keras.saving.get_registered_object(registered) is None):
                entry = (registered.split(">")[-1], module)
                if entry not in found:
                    found.append(entry)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def _missing_class_message(path, err, imported):
    """The one-line error for a model that needs custom objects, or None when that is not the fault."""
    missing = unregistered_objects(path)
    if not missing:
        match = _MISSING.search(str(err))
        if not match:
            return None
        missing = [(match.group(1), None)]
    names = ", ".join(name + (f" (module {module!r})" if module else "") for name, module in missing)
    modules = [m for _, m in missing if m and m != "__main__"]
    example = f", e.g. --import {modules[0]}" if modules else ""
    done = f" (imported so far: {', '.join(imported)})" if imported else ""
    return (
        f"cannot load {path}: it uses the custom class {names}, which is not registered{done}: pass "
        f"--import MODULE with the module or .py file that defines it with "
        f"@keras.saving.register_keras_serializable{example}."
    )


def _not_a_model_file(path):
    """Why ``path`` cannot be a saved Keras model (checked from its first bytes), or None.

    Keras says "File not found" for a ``.keras`` file that is not the zip archive
    ``model.save`` writes; this names the real fault.
    """
    if os.path.isdir(path):
        return (f"{path} is a folder, not a Keras model file: pass the .keras file written by "
                "model.save('model.keras').")
    kinds = {".keras": (b"PK", "a zip archive"), ".h5": (b"\x89HDF", "an HDF5 file"),
             ".hdf5": (b"\x89HDF", "an HDF5 file")}
    extension = os.path.splitext(path)[1].lower()
    if extension not in kinds:
        return None  # Keras names the extensions it reads
    magic, kind = kinds[extension]
    try:
        with open(path, "rb") as f:
            head = f.read(len(magic))
    except OSError as e:
        return f"cannot read the model file {path} ({e.strerror or e})."
    if head != magic:
        return (f"{path} is not a Keras model file (a {extension} file is {kind} written by "
                f"model.save; this one {'is empty' if not head else 'is not'}).")
    return None


def load_model(path, imports=None):
    """The saved Keras model (with its compiled loss when it was saved compiled).

    Args:
        path: the ``.keras`` (or ``.h5``) file.
        imports: modules to import first (``--import``), so that custom objects load.
    """
    if not os.path.exists(path):
        raise CLIError(f"model file not found: {path}")
    not_a_model = _not_a_model_file(path)
    if not_a_model:
        raise CLIError(not_a_model)
    import_modules(imports)
    import warnings

    import keras

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optimizer-variable mismatches are irrelevant here
            return keras.models.load_model(path)
    except Exception as err:
        message = _missing_class_message(path, err, list(imports or ()))
        raise CLIError(message or f"cannot read the model file {path}: {first_line(err)}") from None


# ======================================================================= the data


def load_digits_data(split="train"):
    """The bundled 8x8 digits as the package's loader gives them (the demo trains on these):
    x float32 [n, 8, 8, 1] in [0, 1], y int64 [n]; split "train" (1,400) or "test" (397)."""
    from keras_hesstrace.data import load_digits

    if split not in ("train", "test"):
        raise CLIError(f"--split {split!r}: the digits have the splits 'train' and 'test'.")
    return load_digits(split=split).arrays()


def load_tfds_data(name, split, num_examples, data_dir=None):
    """(x, y) numpy arrays from a tensorflow-datasets dataset that is prepared on disk.

    Never downloads: a dataset that is not prepared (this machine may be offline, where
    tfds.load would retry for minutes) is a clear CLIError at once. Images are scaled to
    float32 in [0, 1].
    """
    import tensorflow_datasets as tfds

    from keras_hesstrace.data.loaders import DatasetNotPreparedError, prepared_dataset

    try:
        _, ds = prepared_dataset(name, split, data_dir)
    except DatasetNotPreparedError as err:
        raise CLIError(
            f"--data {name}: {first_line(err)} Prepare it once on a machine with internet "
            f"(tfds.builder({name!r}).download_and_prepare()) and pass --data-dir, or use --data digits "
            "or an .npz file."
        ) from None
    except Exception as err:  # DatasetNotFoundError and friends: the message names the problem
        raise CLIError(f"--data {name}: not 'digits', not an .npz file, and not a known tfds dataset ({first_line(err)}).") from None
    take = None if num_examples is None else int(num_examples)
    if take is not None:
        ds = ds.take(take)
    xs, ys = [], []
    for image, label in tfds.as_numpy(ds.batch(1024)):
        xs.append(image)
        ys.append(label)
    import numpy as np

    x, y = np.concatenate(xs), np.concatenate(ys)
    if x.dtype == np.uint8:
        x = (x / 255.0).astype("float32")
    return x, y


def load_npz_data(path):
    """(x, y) from an .npz file holding arrays named x and y."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise CLIError(f"--data {path}: the .npz needs arrays named x and y; it has {f.files}.")
            return f["x"], f["y"]
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(f"--data {path}: cannot read it as an .npz file ({err}).") from None


def load_data(args):
    """(x, y, description) per --data, --num-examples, --split, --data-dir."""
    import numpy as np

    source = args.data
    if source == "digits":
        x, y = load_digits_data(args.split)
        desc = f"digits (scikit-learn's bundled 8x8) [{args.split}]"
    elif source.endswith(".npz"):
        if not os.path.exists(source):
            raise CLIError(f"--data {source}: file not found.")
        x, y = load_npz_data(source)
        desc = source
    else:
        x, y = load_tfds_data(source, args.split, args.num_examples, args.data_dir)
        desc = f"tfds {source} [{args.split}]"
    if np.ndim(x) == 0 or np.ndim(y) == 0:
        raise CLIError(f"--data {source}: x and y must be arrays with one row per example, not scalars.")
    if len(x) != len(y):
        raise CLIError(f"--data {source}: x has {len(x)} examples but y has {len(y)}.")
    if args.num_examples is not None:
        if args.num_examples < 1:
            raise CLIError(f"--num-examples must be >= 1, got {args.num_examples}.")
        x, y = x[: args.num_examples], y[: args.num_examples]
    if len(x) == 0:
        raise CLIError(f"--data {source}: no examples.")
    return np.asarray(x), np.asarray(y), desc


# ======================================================================= loss and fit


def resolve_cli_loss(model, name, from_logits):
    """The loss for the Hessian: --loss NAME, else the model's compiled loss."""
    import keras

    if name is None:
        if getattr(model, "loss", None) is None:
            raise CLIError(
                "the model has no compiled loss (saved without model.compile(loss=...)): pass --loss NAME, "
                "e.g. --loss sparse_categorical_crossentropy --from-logits."
            )
        if from_logits:
            raise CLIError("--from-logits only applies with --loss (the compiled loss keeps its own setting).")
        return None
    try:
        fn = keras.losses.get(name)
    except Exception:
        fn = None
    if fn is None:
        raise CLIError(f"unknown --loss {name!r}: use a Keras loss name such as sparse_categorical_crossentropy or mse.")
    if from_logits:
        if isinstance(fn, keras.losses.Loss):
            raise CLIError(f"--from-logits needs a loss function name (e.g. sparse_categorical_crossentropy), not {name!r}.")

        def loss(y_true, y_pred):
            return fn(y_true, y_pred, from_logits=True)

        loss.__name__ = f"{name}(from_logits=True)"
        return loss
    return fn


def fit_data_to_model(model, x):
    """x cast to the model's input dtype; reshaped when only the layout differs. CLIError if it cannot fit."""
    import numpy as np

    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        return x  # subclassed or multi-input models: checked by the trial call below
    shape = tuple(inputs[0].shape[1:])
    dtype = inputs[0].dtype
    if x.dtype.kind in "fiu" and np.dtype(dtype).kind == "f":
        x = x.astype(dtype)
    if None not in shape and tuple(x.shape[1:]) != shape:
        if int(np.prod(x.shape[1:])) == int(np.prod(shape)):
            print(f"note: reshaping the data from {tuple(x.shape[1:])} to the model's input shape {shape}")
            return x.reshape((len(x),) + shape)
        raise CLIError(f"the data does not fit the model: its examples have shape {tuple(x.shape[1:])}, the model takes inputs of shape {shape}.")
    return x
