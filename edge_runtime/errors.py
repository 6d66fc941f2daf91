"""The one exception type that user-facing code turns into a one-line message and a non-zero exit."""

from __future__ import annotations


def install_extra(extra: str) -> str:
    """The command that adds an optional extra (setup.cfg's extras_require). edge-runtime is installed from its
    checkout, not from a package index, so 'pip install edge-runtime[x]' would find nothing."""
    return f"pip install '.[{extra}]' in the edge-runtime checkout"


class EdgeRuntimeError(Exception):
    """Bad input, unsupported model, corrupt file, missing device: anything a user can fix.

    The message must be a single line that says what is wrong and, where possible, what to do.
    """


class ModelFormatError(EdgeRuntimeError):
    """A packed model directory or Hugging Face checkpoint that cannot be read as promised."""


class UnsupportedModelError(EdgeRuntimeError):
    """An architecture or option this runtime does not implement."""


class NumericalError(EdgeRuntimeError):
    """The model computed NaN or inf (damaged or badly converted weights): the model's fault, not the request's."""

    @classmethod
    def logits(cls, where: str) -> NumericalError:
        return cls(f"the model computed a NaN or infinite logit {where}: its weights are damaged or not finite "
                   f"(check the files with 'edge-runtime info --verify'), or its activations overflow (fp16 on the "
                   f"GPU)")
