"""The offline sparsity search: profile heads on calibration prompts, choose a pattern per head."""

from .candidates import candidate_patterns
from .profile import HeadProfiler, LayerStats
from .search import SearchConfig, search
from .solver import CostModel, flops_cost_model, measure_cost_model, solve_lagrangian, solve_per_head

__all__ = ["search", "SearchConfig", "candidate_patterns", "HeadProfiler", "LayerStats", "CostModel",
           "flops_cost_model", "measure_cost_model", "solve_per_head", "solve_lagrangian"]
