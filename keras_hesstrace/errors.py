"""The line of an exception's message that says what went wrong.

TensorFlow's messages for errors raised while tracing begin "in user code:" and a
stack; those raised while a graph ran begin "Graph execution error:" and a stack; Keras
adds "Exception encountered when calling ..." and the arguments the layer received. A
user (the CLI's one-line errors, ``mode="auto"``'s reason for falling back) needs the
cause, not the stack.
"""

import re

_STACK = ("in user code:", "Graph execution error:", "File ", "[[", "Detected at node", "raise ", "return ",
          "Arguments received", "•")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(err: BaseException) -> str:
    """The cause of ``err`` in one line (its type name when the message is empty).

    A plain message gives its first non-empty line. A TensorFlow/Keras message gives the
    first line past the stack that names an error, joined with the next one when it ends
    in a colon, else the last line past the stack; a leading "<Type>: " of ``err``'s own
    type and a trailing "[Op:...]" are dropped.

    >>> error_summary(ValueError("a\\nb"))
    'a'
    >>> error_summary(TypeError("in user code:\\n  File f, line 1\\n  TypeError: bad dtype"))
    'bad dtype'
    """
    lines = [_ANSI.sub("", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(err).__name__
    if not lines[0].startswith(("in user code:", "Graph execution error:")):
        return lines[0]
    body = [line for line in lines[1:] if not line.startswith(_STACK) and not line.endswith(("*", "**"))
            and "Exception encountered" not in line]
    if not body:
        return lines[-1]
    errors = [i for i, line in enumerate(body) if "rror" in line]
    i = errors[0] if errors else len(body) - 1
    text = " ".join(body[i:i + 2]) if i < len(body) - 1 and body[i].endswith(":") else body[i]
    text = re.sub(r"\s*\[Op:[^\]]*\]$", "", text)
    prefix = f"{type(err).__name__}: "
    return text[len(prefix):] if text.startswith(prefix) else text
