"""Drop-in adapters for existing distillation code (``sre2l``: SRe2L-style recover scripts)."""
from . import sre2l

__all__ = ["sre2l"]
