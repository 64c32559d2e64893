"""HF PEFT LoRA on the rows of a hyjax job, scored by hyjax's own evaluation: the reference the benchmarks
compare our methods with at the same budget, data order and scoring.

* `job_rows(config, steps)`: the rows of each step of `python -m hyjax.train` under `config` (its data
  pipeline, shuffle seed and order), as `(prompt + answer ids, answer length)` lists.
* `train_peft_lora(...)`: LoRA (r 8, alpha 16, the seven projections, float32) on transformers' LLaMA,
  AdamW with the hyjax run's learning rate, schedule and clipping,
  each batch left-padded to its longest row as a PEFT user's collator does; loss on the answer tokens.
* `score_classification(config, folder)`: accuracy and answer loss of a Hugging Face model folder on
  `config`'s held-out rows with the evaluation a hyjax run uses (`hyjax.evaluation.likelihood`, one prompt pass,
  the two verbalized labels), and which rows it got right.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def job_rows(config, steps: int) -> tuple[list[list[tuple[list[int], int]]], int]:
    """`(rows of every step, pad id)`: the `(prompt + answer ids, answer length)` rows that a hyjax run
    of `config` trains on at each of its first `steps` steps."""
    from hyjax.data import prepare

    tokenizer = load_run_tokenizer(config)
    data = prepare(config.data, tokenizer, global_batch_size=config.train.global_batch_size, process_index=0,
                   process_count=1)
    out = []
    for _ in range(steps):
        batch = next(data.train)
        rows = []
        for tokens, targets, mask, segments in zip(batch["tokens"], batch["targets"], batch["loss_mask"],
                                                    batch["segment_ids"]):
            n = int(np.sum(segments > 0))
            rows.append(([*tokens[:n].tolist(), int(targets[n - 1])], int(np.sum(mask))))
        out.append(rows)
    return out, tokenizer.pad_id


def model_file(config) -> pathlib.Path:
    """The checkpoint `config.model.path` names, as a run reads it (a known name fetched by
    `hyjax.pretrained`, else the path itself)."""
    from hyjax import pretrained

    section = config.model
    return pretrained.fetch(section.path) if section.pretrained else pathlib.Path(section.path)


def load_run_tokenizer(config):
    """The tokenizer a run of `config` uses: `model.tokenizer`, else the checkpoint's."""
    from hyjax.tokenization import load_tokenizer

    return load_tokenizer(config.model.tokenizer or model_file(config))


def hf_copy(config, folder: pathlib.Path) -> pathlib.Path:
    """A Hugging Face folder of `config`'s model (written once), for transformers to load."""
    if not (folder / "config.json").is_file():
        from hyjax.weights import load_checkpoint, save_hf_checkpoint

        save_hf_checkpoint(folder, *load_checkpoint(model_file(config)))
    return folder


def train_peft_lora(hf_folder: pathlib.Path, steps: list, pad_id: int, *, train, seed: int, threads: int,
                    rank: int = 8, alpha: float = 16.0):
    """Trains PEFT LoRA on `steps` (from `job_rows`) with the learning rate, schedule and AdamW settings of
    `train` (a hyjax `train` section; its schedule is `hyjax.optim.schedule.learning_rate_schedule`'s); returns
    `(peft model, per-step losses, seconds)`. A step's time runs from building its batch to the loss on
    the host."""
    import peft
    import torch
    import transformers

    from hyjax.optim.schedule import learning_rate_schedule

    schedule = learning_rate_schedule(train, len(steps))
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                       target_modules=PROJECTIONS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.b1, train.b2), eps=train.eps,
                                  weight_decay=train.weight_decay)
    losses, seconds = [], []
    for index, rows in enumerate(steps):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(index))
        length = max(len(tokens) for tokens, _ in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (tokens, answer) in enumerate(rows):
            input_ids[i, length - len(tokens):] = torch.tensor(tokens)
            attention[i, length - len(tokens):] = 1
            labels[i, length - answer:] = torch.tensor(tokens[-answer:])
        # transformers shifts labels by one inside the loss: position t predicts labels[t + 1]
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        if train.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    return model, losses, seconds


def score_classification(config, folder: pathlib.Path):
    """`hyjax.evaluation.EvalResult` of the Hugging Face model in `folder` on `config`'s held-out rows
    (`data.eval_path`, at most `eval.num_examples`), scored as a hyjax run's evaluation scores them."""
    from hyjax.data import held_out_rows
    from hyjax.evaluation import candidate_log_likelihoods, classification_accuracy
    from hyjax.weights import load_checkpoint

    tokenizer = load_run_tokenizer(config)
    rows, task = held_out_rows(config.data, config.eval.num_examples)
    model_config, params = load_checkpoint(folder)

    def score(groups):
        return candidate_log_likelihoods(model_config, params, groups, pad_id=tokenizer.pad_id,
                                         max_length=config.data.max_length, batch_size=config.eval.batch_size,
                                         bucket=config.data.bucket)

    return classification_accuracy(rows, task, tokenizer, score)


def merged_folder(model, folder: pathlib.Path) -> pathlib.Path:
    """The PEFT model's LoRA merged into its weights, saved as the Hugging Face folder `folder` (float32)."""
    model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    return folder
