"""`python -m hyjax.eval MODEL [CONFIG] [key=value ...]`: evaluate a model on held-out data, no training.

MODEL is a run folder (its latest checkpoint, or `--step`), a Hugging Face folder (a merged export), a
GGUF file, a Hub name (org/name, org/name/file.gguf) or `smollm2-135m-instruct`; `--adapter` adds a
PEFT adapter folder (LoRA or BOFT) on top of a base model. The data and task come from CONFIG and the
overrides (`data.*`, `eval.*`), for a run folder from the run's own config; `--data` sets
`data.eval_path` (a file, `bundled:...` or `hf:org/name:split`). Prints a table: the task's metric
(classification accuracy, math exact match), answer-token loss and perplexity; `--json FILE` also
writes it with the per-row results and samples.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hyjax.eval", description=__doc__.split("\n\n")[0],
                                     epilog="Every data and eval key with its meaning: configs/base.yaml.")
    parser.add_argument("model", help="a run folder, a Hugging Face folder, a .gguf file, a Hub name or "
                                      "smollm2-135m-instruct")
    parser.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                        help="a config file or name for the data and task, and/or dotted overrides")
    parser.add_argument("--adapter", help="a PEFT adapter folder to apply to MODEL (a base model)")
    parser.add_argument("--data", help="the held-out data (sets data.eval_path): a file, bundled:NAME or "
                                       "hf:org/name:split")
    parser.add_argument("--step", type=int, help="for a run folder: the checkpoint step (default: the latest)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': to stdout)")
    return parser


def is_run_folder(path: pathlib.Path) -> bool:
    """Whether `path` is a run's output folder or checkpoint folder (not a model folder)."""
    if not path.is_dir() or (path / "config.json").is_file():
        return False
    return (path / "checkpoints").is_dir() or any(p.name.isdigit() and p.is_dir() for p in path.iterdir())


def evaluate(args) -> dict:
    """The evaluation `args` ask for, as `{"model", "data", "examples", "metrics", "correct_rows", "samples"}`."""
    import jax

    from hyjax import adapters
    from hyjax.config import ConfigError, RunConfig, apply_override, load_config, saved_tree
    from hyjax.config.typed import build
    from hyjax.data import held_out_rows
    from hyjax.hub import resolve_model
    from hyjax.tokenization import load_tokenizer
    from hyjax.evaluation.held_out import HeldOutEvaluation
    from hyjax.training.restore import restore
    from hyjax.training.step import answer_nll_sum
    from hyjax.weights import load_checkpoint

    overrides = [item for item in args.items if "=" in item]
    files = [item for item in args.items if "=" not in item]
    if len(files) > 1:
        raise ConfigError(f"give one config file, got {files}; overrides are written key=value")
    if args.data:
        overrides.append(f"data.eval_path={args.data}")
    model_path = pathlib.Path(args.model).expanduser()
    run = None
    if is_run_folder(model_path):
        if args.adapter:
            raise ConfigError("--adapter applies to a base model, not to a run folder (its adapters are in it)")
        if files:
            raise ConfigError(f"a run folder evaluates with its own config; give overrides, not {files[0]!r}")
        run = restore(model_path, step=args.step)
        tree = saved_tree(json.loads(json.dumps(run.meta["config"])))
        for override in overrides:
            apply_override(tree, override)
        config = build(RunConfig, tree)
        model_config, tokenizer = run.model_config, run.tokenizer
        params = run.setup.plan.params(run.state, run.frozen)
        eval_step = run.setup.plan.eval_step()

        def batch_loss(batch):
            return eval_step(run.state, run.frozen, batch)
        described = f"{model_path} (step {run.step}, {config.method.name})"
    else:
        if args.step is not None:
            raise ConfigError("--step applies to run folders only")
        config = load_config(files[0] if files else None, overrides)
        path = resolve_model(args.model)
        model_config, params = load_checkpoint(path)
        tokenizer = load_tokenizer(config.model.tokenizer or path)
        described = str(args.model)
        if args.adapter:
            params = adapters.merge(adapters.import_peft(args.adapter, model_config, params))
            described += f" + {args.adapter}"
        loss = jax.jit(answer_nll_sum, static_argnums=0)

        def batch_loss(batch):
            return loss(model_config, params, batch)
    held_out = held_out_rows(config.data, config.eval.num_examples)
    if held_out is None:
        raise ConfigError("nothing to evaluate on: give --data FILE (or data.eval_path=FILE, or data.path with "
                          "data.eval_count)")
    rows, task = held_out
    evaluation = HeldOutEvaluation(model_config, tokenizer, rows, task, eval_config=config.eval,
                                   max_length=config.data.max_length, bucket=config.data.bucket, progress=True)
    if not evaluation.enabled:
        raise ConfigError(f"none of the {len(rows)} held-out rows of {rows.path} is usable by the "
                          f"{config.data.task} task")
    metrics = evaluation.metrics(params, batch_loss)
    return {"model": described, "data": config.data.eval_path or f"held out of {config.data.path}",
            "task": config.data.task, "examples": metrics.pop("eval/examples"),
            "metrics": {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")},
            "correct_rows": metrics.get("correct_rows"), "samples": metrics.get("samples", [])}


def table(result: dict) -> str:
    """The result as aligned `name  value` lines."""
    lines = [("model", result["model"]), ("data", f"{result['data']} ({result['examples']} rows, "
                                                    f"{result['task']})")]
    lines += [(name, f"{value:.4f}") for name, value in result["metrics"].items()]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # options may come between the config and overrides
    # deferred: --help and argument errors answer before JAX and the model code load
    from hyjax.config import ConfigError
    from hyjax.data import MalformedDataError
    from hyjax.model.config import UnsupportedConfigError
    from hyjax.pretrained import PretrainedFetchError
    from hyjax.training import CheckpointMismatchError
    from hyjax.weights import CheckpointError

    try:
        result = evaluate(args)
    except (ConfigError, CheckpointMismatchError, MalformedDataError, FileNotFoundError, CheckpointError,
            UnsupportedConfigError, PretrainedFetchError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
