"""Ahead-of-time analysis of a run: will it fit, and how fast can its step be? The training step that
`plan_run` builds, compiled for a TPU topology on this machine (`planner`), read back from its optimized
HLO through one parser (`hlo`): FLOPs and HBM traffic with every loop iteration counted (`cost`) and
the largest arrays it computes (`buffers`).

    result = plan(load_config("llama3.1-405b-hybrid"), "v5p:8x8x8")
    print(result.report())          # per-chip memory against HBM, roofline, largest arrays
"""

from hyjax.planning.buffers import Buffer, largest_buffers
from hyjax.planning.cost import Cost, program_cost
from hyjax.planning.planner import Plan, PlanError, parse_topology, plan

__all__ = ["Buffer", "Cost", "Plan", "PlanError", "largest_buffers", "parse_topology", "plan", "program_cost"]
