"""The progress bars of the estimators: Keras's Progbar, plain when stdout is not a terminal."""

import sys


def progress_bar(target, unit_name):
    """A ``keras.utils.Progbar`` counting ``unit_name`` up to ``target`` (None: unknown).

    On a terminal it redraws one line. Otherwise (output redirected to a file or a pipe) it
    writes one plain line when it finishes: Keras's own test for a dynamic display is true on
    every POSIX system, so its bar would write colour codes, backspaces and carriage returns
    into the file.
    """
    import keras

    tty = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
    return keras.utils.Progbar(target, unit_name=unit_name, verbose=1 if tty else 2)


def finish(bar, done):
    """End ``bar`` at ``done`` (an early stop ends the bar full: its target becomes ``done``)."""
    if bar is None:
        return
    if bar.target == done and getattr(bar, "_seen_so_far", None) == done:
        return  # the update that reached the target finished it
    if bar.target is not None and done != bar.target:
        bar.target = done
    bar.update(done, finalize=True)
