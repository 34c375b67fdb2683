"""Exceptions raised by unidd_fast. Each message names the problem and the fix."""


class UniddError(Exception):
    """Base class of every error this package raises on purpose."""


class NonFiniteError(UniddError, FloatingPointError):
    """NaN or Inf found in features, statistics, images or a loss."""


class NotPositiveDefiniteError(UniddError, ValueError):
    """(Ψ + βI) failed its Cholesky factorisation."""


class StatsMismatchError(UniddError, ValueError):
    """A statistics file does not belong to the model / sites / classes it is used with."""


class StatsFileError(UniddError, OSError):
    """A statistics file is missing, truncated, corrupted or of an unknown format."""


class ConfigError(UniddError, ValueError):
    """An argument or a run configuration is invalid."""
