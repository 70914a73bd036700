"""The offline sparsity search: profile heads on calibration prompts, choose what every head does over the
whole denoising schedule, verify end to end against stated targets.

Modules: ``profile`` (candidate errors from real calls), ``candidates``, ``schedule`` (the whole-run solve),
``accounting`` (what a strategy costs over a generation), ``solver`` (cost models, Lagrangian), ``verify``
(generations dense and accelerated), ``targets`` (the tuning loop), ``picture``, ``search`` (all of it).
"""

from .accounting import Accounting, account
from .candidates import candidate_patterns
from .profile import HeadProfiler, LayerStats
from .search import SearchConfig, search
from .solver import CostModel, flops_cost_model, measure_cost_model, solve_lagrangian, solve_per_head

__all__ = ["search", "SearchConfig", "account", "Accounting", "candidate_patterns", "HeadProfiler", "LayerStats",
           "CostModel", "flops_cost_model", "measure_cost_model", "solve_per_head", "solve_lagrangian"]
