"""`python -m hyjax.plan [CONFIG] [key=value ...] --topology v5p:8x8x8`: will this run fit a TPU pod?

Compiles the run's training step for the topology on this machine, without a TPU, and reports
per-chip memory against HBM (hyjax.planning.planner). Exits 0 when it fits, 1 when it does not, 2 on
bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from hyjax.cli.train import split_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyjax.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                        help="a config file or name and/or dotted overrides, as for python -m hyjax.train")
    parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:8x8x8, v5p:4x4x4, v6e:16x16")
    parser.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    parser.add_argument("--selection", metavar="FILE",
                        help="a run's module_selection.json (Hybrid-LoRA): plan the modules it chose "
                             "(default: the budget filled with the largest modules)")
    args = parser.parse_intermixed_args(argv)

    # deferred: --help and argument errors answer before JAX and the model code load
    from hyjax.config import ConfigError, load_config
    from hyjax.sharding import ShardingError
    from hyjax.planning.planner import PlanError, parse_topology, plan

    try:
        parse_topology(args.topology)  # before anything is loaded
        selection = read_selection(args.selection) if args.selection else None
        name, overrides = split_arguments(args.items, None)
        result = plan(load_config(name, overrides), args.topology, selection=selection)
    except (PlanError, ConfigError, ShardingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.report())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=2)
    return 0 if result.fits else 1


def read_selection(path: str) -> dict:
    """The JSON of a run's start-up choice; ValueError naming the file when it cannot be read."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--selection {path}: cannot read it as JSON ({err}); give a run's "
                         "module_selection.json") from err
    if not isinstance(data, dict) or "modules" not in data:
        raise ValueError(f"--selection {path} has no 'modules': give a run's module_selection.json")
    return data


if __name__ == "__main__":
    sys.exit(main())
