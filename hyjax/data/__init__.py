"""Data pipeline: read files, turn rows into (prompt, answer) examples, batch them with loss masks.

    rows = load_rows("../shared/data/sst2/train.tsv")
    examples, report = build_examples(rows, sst2(), tokenizer)
    batches = BatchIterator(examples, global_batch_size=8, max_length=256, pad_id=tokenizer.pad_id, seed=0)
    batch = next(batches)  # tokens, targets, loss_mask, segment_ids, positions: [B, T]; loss_positions [B, K]
"""

from hyjax.data.batching import (
    BATCH_KEYS,
    loss_positions,
    loss_slots,
    pack_rows,
    packed_batch,
    pad_batch,
    round_up,
    truncate,
)
from hyjax.data.classification import TEXT_COLUMNS, Classification, sst2
from hyjax.data.examples import Example, PromptStyle, build_examples
from hyjax.data.instructions import Instructions
from hyjax.data.iterator import BatchIterator, epoch_order
from hyjax.data.loss import masked_cross_entropy, masked_log_likelihood
from hyjax.data.config import TASKS, DataConfig
from hyjax.data.pipeline import (
    PreparedData,
    check_held_out,
    evaluation_set,
    held_out_rows,
    make_task,
    prepare,
    training_rows,
)
from hyjax.data.math_problems import MathWordProblems, extract_final_answer, gsm8k, normalize_number
from hyjax.data.reading import FORMATS, Rows, infer_format, load_rows, pick_column
from hyjax.data.report import BadRow, BadRowLimit, DataReport, MalformedDataError, MalformedRow
from hyjax.data.split import train_eval_split

__all__ = [
    "BATCH_KEYS", "FORMATS", "TASKS", "TEXT_COLUMNS", "DataConfig", "PreparedData", "check_held_out", "evaluation_set",
    "held_out_rows", "make_task", "prepare", "BadRow", "BadRowLimit", "BatchIterator", "Classification",
    "DataReport", "Example", "Instructions", "MalformedDataError",
    "MalformedRow", "MathWordProblems", "PromptStyle", "Rows", "build_examples",
    "epoch_order", "extract_final_answer", "gsm8k", "infer_format", "load_rows", "loss_positions", "loss_slots",
    "masked_cross_entropy", "masked_log_likelihood", "normalize_number", "pack_rows",
    "packed_batch", "pad_batch", "pick_column", "round_up", "sst2", "train_eval_split", "training_rows", "truncate",
]
