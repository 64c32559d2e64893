"""`python -m hyjax.generate --prompt "..."`: answer a prompt with a LLaMA-family model.

By default the model is the real SmolLM2-135M-Instruct (fetched once into the user cache) and the
prompt is wrapped in the checkpoint's chat template; `--model` takes a `.gguf` file, a Hugging Face
folder or a Hub name (`hyjax.hub`), `--raw` continues the text as it is.
"""

from __future__ import annotations

import argparse
import sys
import time

from hyjax import pretrained

DEFAULT_MODEL = pretrained.SMOLLM2_135M_INSTRUCT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hyjax.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a .gguf file, a Hugging Face checkpoint folder, a Hub name (org/name, "
                             f"org/name/file.gguf), or {DEFAULT_MODEL!r} (default)")
    parser.add_argument("--tokenizer", help="tokenizer path if the model's own is not wanted")
    parser.add_argument("--chat-template", help="built-in template name (chatml, zephyr, llama2, llama3) or "
                                                "jinja2 text, replacing the checkpoint's")
    parser.add_argument("--system", help="system message for the chat template")
    parser.add_argument("--raw", action="store_true", help="continue the prompt text without a chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute and parameter dtype")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # deferred: --help and argument errors answer before JAX and the model code load
    from hyjax.sampling import SamplingConfig

    try:
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as err:
        _parser().error(str(err))

    from hyjax.weights import CheckpointError, load_checkpoint
    from hyjax.sampling import generate
    from hyjax.model.config import UnsupportedConfigError
    from hyjax.hub import resolve_model
    from hyjax.pretrained import PretrainedFetchError
    from hyjax.tokenization import load_tokenizer

    try:
        start = time.perf_counter()
        model_path = resolve_model(args.model)
        tokenizer = load_tokenizer(args.tokenizer or model_path, chat_template=args.chat_template)
        if args.raw:
            prompt_ids = tokenizer.encode(args.prompt)
        else:
            if tokenizer.chat_template is None:
                raise ValueError(f"{model_path} carries no chat template: pass --chat-template NAME or --raw")
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": args.prompt})
            prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False)
        config, params = load_checkpoint(model_path, param_dtype=args.dtype, dtype=args.dtype)
        loaded = time.perf_counter()
        new_tokens = generate(config, params, [prompt_ids], sorted(tokenizer.stop_ids), sampling,
                              pad_id=tokenizer.pad_id)[0]
        done = time.perf_counter()
    except (FileNotFoundError, CheckpointError, UnsupportedConfigError, PretrainedFetchError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(tokenizer.decode(new_tokens).strip())
    print(f"[{model_path.name}: loaded in {loaded - start:.1f}s; {len(prompt_ids)} prompt + {len(new_tokens)} "
          f"new tokens in {done - loaded:.1f}s (compile included)]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
