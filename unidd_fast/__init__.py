"""unidd_fast: dataset distillation by spectral filtering (UniDD, CFM), fast.

Public API: site_stats, flc, cfm_site_loss, beta_schedule, filters, unidd_loss,
collect_real_stats, RealStats, CFMLoss. See README.md and docs/math.md (the equations).
"""
from . import filters
from .errors import (ConfigError, NonFiniteError, NotPositiveDefiniteError, StatsFileError,
                     StatsMismatchError, UniddError)
from .loss import CFMLoss
from .ops import flc, regularized_inverse, site_stats
from .real_stats import RealStats, collect_real_stats
from .schedule import beta_schedule
from .site_loss import cfm_site_loss
from .unidd import unidd_loss

__version__ = "0.1.0"

__all__ = [
    "CFMLoss", "ConfigError", "NonFiniteError", "NotPositiveDefiniteError", "RealStats",
    "StatsFileError", "StatsMismatchError", "UniddError", "beta_schedule", "cfm_site_loss",
    "collect_real_stats", "filters", "flc", "regularized_inverse", "site_stats", "unidd_loss",
]
