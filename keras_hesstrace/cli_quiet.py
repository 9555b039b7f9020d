"""A quiet TensorFlow for the command line: its C++ logs off and its start-up lines dropped.

``quiet_tensorflow()`` runs before a command imports TensorFlow (``--verbose`` skips it).
"""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# TensorFlow's C++ log level while a command runs, unless --verbose or the user's own setting:
# 3 hides its C++ errors too, which on a CPU are notices ("oneDNN supports DT_INT32 only on
# platforms with AVX-512"); a real failure still raises a Python exception, printed as one line.
QUIET_TF_LOG_LEVEL = "3"


# TensorFlow's start-up lines: the absl notice, its info and warning lines (glog format),
# and the error that there is no GPU driver -- on a machine without a GPU, no error at all.
_TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] .*"
    r"|E\d{4} [\d:.]+ +\d+ \S+:\d+\] .*(cuInit|CUDA|cuda).*"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)$")


@contextlib.contextmanager
def _tensorflow_noise_dropped():
    """Drop TensorFlow's start-up lines from stderr (file descriptor 2) inside the block.

    What else the block writes to stderr is written after it, in order.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode("utf-8", "replace").splitlines()
                    if not _TF_NOISE.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Imports TensorFlow, when something first does, with its start-up lines dropped.

    TF 2.21 writes lines before its logging starts -- "oneDNN custom operations are on",
    "Could not find cuda drivers" -- that TF_CPP_MIN_LOG_LEVEL does not silence, and the
    cuInit error when it looks for a GPU. They are written by C++ straight to file
    descriptor 2, so the import (and the device lookup) runs with it caught.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real = spec.loader.exec_module

        def exec_module(module):
            with _tensorflow_noise_dropped():
                real(module)
                try:
                    module.config.list_physical_devices()  # the GPU lookup and its cuInit error, now
                except Exception:
                    pass

        spec.loader.exec_module = exec_module
        return spec


def quiet_tensorflow():
    """Quiet TensorFlow for this command (not with --verbose); a log level the user set wins.

    TF_CPP_MIN_LOG_LEVEL=3 (TensorFlow reads it once, when first imported: the commands
    import it after this runs) hides its C++ info, warning and error logs; the lines it writes
    before its logging starts are dropped by importing it through _QuietTensorFlowImport.
    """
    if "tensorflow" in sys.modules:
        return  # too late to change anything
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)  # the user's own setting wins
    if not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
