"""Compatibility path of `llm.errors`: user code and the guide import the errors from here.

The definitions live in `llm/errors.py`, the package's base layer, so that `llm.data` and `llm.models`
can raise them without importing `llm.training`.
"""

from llm.errors import ConfigError, UserError, did_you_mean, invalid

__all__ = ["ConfigError", "UserError", "did_you_mean", "invalid"]
