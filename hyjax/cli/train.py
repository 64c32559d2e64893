"""`python -m hyjax.train [CONFIG] [key=value ...]`: fine-tune a LLaMA-family model.

With no arguments it runs configs/quickstart.yaml: the real SmolLM2-135M-Instruct, the hybrid BOFT +
LoRA-GA method, a slice of SST-2, on CPU, printing dev accuracy before and after. CONFIG is a YAML file
or a name in configs/ (`quickstart`, `methods/lora.yaml`); overrides are dotted keys, e.g.
`data.path=my.jsonl train.steps=500 method.name=lora`. Running the same command again resumes from
the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from hyjax.cli import supervisor

DEFAULT_CONFIG = "quickstart"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hyjax.train", description=__doc__.split("\n\n")[0],
                                     epilog="Every key with its default and meaning: configs/base.yaml.")
    parser.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                        help=f"a config file or name (default {DEFAULT_CONFIG!r}) and/or dotted overrides")
    parser.add_argument("--config", help="the config file or name (instead of the first positional argument)")
    parser.add_argument("--coordinator", help="host:port of process 0, for a multi-process run without a "
                                              "cluster manager (TPU VM pods and SLURM are detected)")
    parser.add_argument("--num-processes", type=int, help="processes in the run (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    parser.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                        help="a multi-process run ends on every process when one has been silent this long "
                             "(default 60; a killed process's run can then be started again to resume)")
    return parser


def split_arguments(items: list[str], config: str | None) -> tuple[str, list[str]]:
    """`(config file or name, overrides)` from the positional arguments."""
    overrides = [item for item in items if "=" in item]
    files = [item for item in items if "=" not in item]
    if config is not None:
        files = [config, *files]
    if len(files) > 1:
        raise ValueError(f"give one config file, got {files}; overrides are written key=value")
    return (files[0] if files else DEFAULT_CONFIG), overrides


def lost_contact_message(where: str, detail: str, checkpoint_dir) -> str:
    """The one line a surviving process of a multi-process run ends with."""
    return (f"error: {where} lost contact with the others ({detail}): another process most likely died. The "
            f"checkpoints in {checkpoint_dir} are intact: start every process again with the same command to resume")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if supervisor.is_child():
        supervisor.die_with_parent()
    # deferred: --help and argument errors answer before JAX and the model code load
    import jax

    from hyjax.config import ConfigError, load_config
    from hyjax.data import MalformedDataError
    from hyjax.model.config import UnsupportedConfigError
    from hyjax.pretrained import PretrainedFetchError
    from hyjax.training import CheckpointMismatchError, CheckpointWriteError, NonFiniteError, distributed, train
    from hyjax.weights import CheckpointError

    try:
        config_name, overrides = split_arguments(args.items, args.config)
        config = load_config(config_name, overrides)
        if distributed.is_multi_process_launch(args.coordinator) and not supervisor.is_child():
            return supervisor.run(sys.argv[1:] if argv is None else argv, lost_contact_message(
                _this_process(distributed.process_layout(args.num_processes, args.process_id)),
                "JAX's distributed runtime ended its training with SIGABRT, see above",
                config.checkpoint_dir))
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
        try:
            train(config)  # prints its summary; an interrupted run has saved a checkpoint to resume from
        except Exception as err:
            if (failure := distributed.peer_failure(err)) is None:
                raise
            where = f"process {jax.process_index()} of {jax.process_count()}"
            print(lost_contact_message(where, str(failure).splitlines()[0], config.checkpoint_dir),
                  file=sys.stderr, flush=True)
            os._exit(3)  # not JAX's shutdown, whose barrier would wait for the dead process
    except (ConfigError, CheckpointMismatchError, MalformedDataError, FileNotFoundError, CheckpointError,
            UnsupportedConfigError, PretrainedFetchError, NonFiniteError, CheckpointWriteError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _this_process(layout: tuple[int | None, int | None]) -> str:
    """"process i of n" of a `distributed.process_layout`; "this process" where it is not known (a
    detected cluster)."""
    count, index = layout
    return "this process" if index is None or not count else f"process {index} of {count}"


if __name__ == "__main__":
    sys.exit(main())
