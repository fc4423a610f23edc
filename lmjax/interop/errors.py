"""What can be wrong with a checkpoint handed to `lmjax.interop.hf`, one error class each, so that a
caller (or a test) can tell a model lmjax cannot run from a file that is broken."""

from lmjax import cli


class InteropError(cli.UserError):
    """A checkpoint that cannot be converted; nothing was written."""


class UnknownModelTypeError(InteropError):
    """config.json names a `model_type` that has no mapping here."""


class UnsupportedConfigError(InteropError):
    """A known architecture with a setting lmjax's model does not implement (or, on export, an lmjax
    model that is neither a GPT-2 nor a Llama)."""


class MissingTensorError(InteropError):
    """config.json implies a tensor the safetensors files lack."""


class UnexpectedTensorError(InteropError):
    """The safetensors files hold a tensor the architecture of config.json does not have."""


class TensorShapeError(InteropError):
    """A tensor whose shape contradicts config.json."""
