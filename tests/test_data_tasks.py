"""Task formats: rows to (prompt, answer) examples, malformed-row reports, masks token by token, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, models, pre_tokenizers

from hyjax.data import (
    BadRowLimit,
    Example,
    Instructions,
    MalformedDataError,
    PromptStyle,
    build_examples,
    gsm8k,
    load_rows,
    pad_batch,
    sst2,
)
from hyjax.evaluation import classification_accuracy, math_exact_match
from hyjax.tokenization import HFTokenizer, builtin_chat_template

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "Review Sentiment positive or negative Question Answer a gorgeous witty film he said dull twice plain words "
    "good bad movie system user assistant You are helpful How many is 2 3 5 \\ \" : ( ) , . # $ ü ï é 🎬"
).split()


def tiny_tokenizer(chat: bool = False) -> HFTokenizer:
    """A word-level tokenizer (ids 0-5 special, then one id per word), optionally with a ChatML template."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return HFTokenizer(
        backend,
        bos_id=1,
        eos_id=5 if chat else 2,
        pad_id=0,
        unk_id=3,
        add_bos=True,
        chat_template=builtin_chat_template("chatml") if chat else None,
    )


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from hyjax.tokenization import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def build(path, task, tok, limit=BadRowLimit(None, None)):
    """Examples and report of the file at `path`, with no limit on malformed rows unless given."""
    return build_examples(load_rows(path, cache_dir=path.parent / "cache"), task, tok, limit=limit)


def ids(tok, text):
    return tuple(tok.encode(text, add_bos=False))


# ---- task formats ------------------------------------------------------------------------------


def test_classification_plain_prompt_and_verbalized_answer():
    tok = tiny_tokenizer()
    ex = sst2().resolve(["label", "sentence"]).example({"label": "1", "sentence": " good movie "}, tok)
    assert ex.prompt_ids == (1, *ids(tok, "Review: good movie\nSentiment (positive or negative):"))
    assert ex.answer_ids == (*ids(tok, " positive"), tok.eos_id)
    neg = sst2().resolve(["label", "content"]).example({"label": 0, "content": "bad"}, tok)
    assert neg.answer_ids == (*ids(tok, "negative"), 2)


def test_classification_with_chat_template():
    tok = tiny_tokenizer(chat=True)
    task = sst2(prompt=PromptStyle(system="You are helpful")).resolve(["label", "sentence"])
    ex = task.example({"label": 1, "sentence": "good"}, tok)
    want = tok.apply_chat_template(
        [
            {"role": "system", "content": "You are helpful"},
            {"role": "user", "content": "Review: good\nSentiment (positive or negative):"},
        ]
    )
    assert ex.prompt_ids == (1, *ids(tok, want))  # BOS once (chatml has none in the text)
    assert ex.answer_ids == (*ids(tok, "positive"), 5)  # answer ends the assistant turn
    row = {"label": 1, "sentence": "good"}
    plain = sst2(prompt=PromptStyle(chat=False)).resolve(["label", "sentence"]).example(row, tok)
    assert 4 not in plain.prompt_ids
    with pytest.raises(ValueError, match="no chat template"):
        sst2(prompt=PromptStyle(chat=True)).resolve(["label", "sentence"]).example(row, tiny_tokenizer())


def test_gsm8k_example_and_options():
    tok = tiny_tokenizer()
    row = {"question": "How many ?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
    ex = gsm8k().example(row, tok)
    assert ex.prompt_ids == (1, *ids(tok, "Question: How many ?\nAnswer:"))
    assert ex.answer_ids == (*ids(tok, row["answer"]), 2)
    assert gsm8k(final_only=True).target(row) == ("#### 5", "5")
    assert gsm8k(keep_calculator=False).target(row)[0] == "2 + 3 = 5\n#### 5"


def test_instructions_prompt_completion_and_messages():
    tok = tiny_tokenizer(chat=True)
    task = Instructions().resolve(["prompt", "completion"])
    assert task.mode == "prompt_completion"
    ex = task.example({"prompt": "How many ?", "completion": " 5"}, tok)
    assert ex.prompt_ids == (1, *ids(tok, tok.apply_chat_template([{"role": "user", "content": "How many ?"}])))
    assert ex.answer_ids == (*ids(tok, "5"), 5)
    messages = [
        {"role": "user", "content": "How many ?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "is 2 ?"},
        {"role": "assistant", "content": "5"},
    ]
    task = Instructions().resolve(["messages", "prompt"])
    assert task.mode == "messages"
    ex = task.example({"messages": messages}, tok)
    assert ex.prompt_ids == (1, *ids(tok, tok.apply_chat_template(messages[:-1])))
    assert ex.answer_ids == (*ids(tok, "5"), 5)
    with pytest.raises(ValueError, match=r"columns present: \['text'\]"):
        Instructions().resolve(["text"])


def test_instructions_from_jsonl_with_bad_messages(tmp_path):
    good = [{"role": "user", "content": "How many ?"}, {"role": "assistant", "content": "5"}]
    rows = [
        {"messages": good},
        {"messages": good[:1]},  # ends with the user
        {"messages": [{"role": "user", "content": "How many ?"}, {"role": "assistant", "content": ""}]},
        {"messages": good},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = build(path, Instructions(), tiny_tokenizer(chat=True))
    assert len(examples) == 2 and report.bad_lines == [2, 3]
    assert "assistant" in report.bad[0].reason and "no text" in report.bad[1].reason


# ---- malformed rows ----------------------------------------------------------------------------


def test_malformed_tsv_rows_are_reported_with_their_lines(tmp_path):
    path = tmp_path / "bad.tsv"
    lines = ["label\tsentence", "1\tgood movie", "2\tbad label", "0\t", "", "x\tgood", "1\tgood", "0"]
    path.write_text("\n".join(lines) + "\n")
    examples, report = build(path, sst2(), tiny_tokenizer())
    assert report.rows == 7 and report.examples == 2 == len(examples)
    assert [e.line for e in examples] == [2, 7]
    assert report.bad_lines == [3, 4, 5, 6, 8]
    reasons = [b.reason for b in report.bad]
    assert "bad label '2'" in reasons[0] and "empty 'sentence'" in reasons[1] and reasons[2] == "blank row"
    assert "bad label 'x'" in reasons[3] and "empty 'sentence'" in reasons[4]


def test_malformed_jsonl_rows_non_string_text_and_missing_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [
        {"question": "How many ?", "answer": "#### 5"},
        {"question": 5, "answer": "#### 5"},
        {"answer": "#### 3"},
        {"question": "How many ?", "answer": "no final number"},
        {"question": "How many ?", "answer": "3 #### 3"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = build(path, gsm8k(), tiny_tokenizer())
    assert [e.line for e in examples] == [1, 5]
    assert report.bad_lines == [2, 3, 4]
    reasons = [b.reason for b in report.bad]
    assert reasons == ["'question' is int, not text", "missing 'question'", "no '#### <number>' in 'answer'"]


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    good, bad = '{"question": "How many ?", "answer": "#### 5"}', '{"question": "How many ?", "answer": "none"}'
    path.write_text(f"\n{good}\n\n{bad}\n")
    examples, report = build(path, gsm8k(), tiny_tokenizer())
    assert [e.line for e in examples] == [2] and report.bad_lines == [4]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"question": "How many ?"}\n\n{"question": 5}\n')
    with pytest.raises(ValueError, match=r"cannot read .*mixed\.jsonl.*blank lines"):
        load_rows(mixed, cache_dir=tmp_path / "c")


def test_too_many_malformed_rows_stop_the_run(tmp_path):
    path = tmp_path / "many.tsv"
    path.write_text("label\tsentence\n" + "".join("1\tgood\n" if i % 10 else "7\tgood\n" for i in range(300)))
    rows = load_rows(path, cache_dir=tmp_path / "c")  # 30 bad of 300: 10%
    message = r"30 of 300 rows are malformed.*first: line 2: bad label '7'.*; line 12: bad label"
    with pytest.raises(MalformedDataError, match=message):
        build_examples(rows, sst2(), tiny_tokenizer())
    _, report = build_examples(rows, sst2(), tiny_tokenizer(), limit=BadRowLimit(max_fraction=0.2, max_rows=100))
    assert len(report.bad) == 30
    with pytest.raises(MalformedDataError):
        build_examples(rows, sst2(), tiny_tokenizer(), limit=BadRowLimit(max_fraction=None, max_rows=29))


def test_one_bad_row_in_a_large_file_passes_the_default(shared_data, tmp_path):
    lines = (shared_data / "sst2" / "dev.tsv").read_text().splitlines()
    lines[10] = "1\t"
    path = tmp_path / "dev.tsv"
    path.write_text("\n".join(lines) + "\n")
    examples, report = build_examples(load_rows(path, cache_dir=tmp_path / "c"), sst2(), tiny_tokenizer())
    assert report.bad_lines == [11] and len(examples) == 871


# ---- masks, token by token ---------------------------------------------------------------------


def check_mask(tok, example: Example):
    batch = pad_batch([example], len(example) + 3, tok.pad_id)
    seq = example.prompt_ids + example.answer_ids
    n_prompt = len(example.prompt_ids)
    for j in range(batch["tokens"].shape[1]):
        if j < len(seq) - 1:
            assert batch["tokens"][0, j] == seq[j] and batch["targets"][0, j] == seq[j + 1]
            assert batch["loss_mask"][0, j] == float(j + 1 >= n_prompt), j
            assert batch["segment_ids"][0, j] == 1 and batch["positions"][0, j] == j
        else:
            assert batch["loss_mask"][0, j] == 0 and batch["segment_ids"][0, j] == 0
    masked_targets = batch["targets"][0][batch["loss_mask"][0] == 1]
    assert tuple(masked_targets) == example.answer_ids
    return masked_targets


def test_loss_mask_covers_exactly_the_answer_tiny():
    tok = tiny_tokenizer()
    ex = sst2().resolve(["label", "sentence"]).example({"label": 0, "sentence": "dull film"}, tok)
    assert tuple(check_mask(tok, ex)) == (tok.token_to_id("negative"), tok.eos_id)


def test_loss_mask_covers_exactly_the_answer_smollm2(smollm2, shared_data, tmp_path):
    rows = load_rows(shared_data / "sst2" / "dev.tsv", cache_dir=tmp_path).select(range(3))
    examples, _ = build_examples(rows, sst2(), smollm2)
    for ex in examples:
        answer = check_mask(smollm2, ex)
        assert smollm2.decode(answer, skip_special_tokens=False) in ("negative<|im_end|>", "positive<|im_end|>")
        assert smollm2.decode(ex.prompt_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    gsm = load_rows(shared_data / "gsm8k" / "train.jsonl", cache_dir=tmp_path).select([0])
    (ex,), _ = build_examples(gsm, gsm8k(prompt=PromptStyle(chat=False)), smollm2)
    answer = check_mask(smollm2, ex)
    assert smollm2.decode(answer, skip_special_tokens=False) == " " + gsm[0]["answer"] + "<|im_end|>"


# ---- evaluation helpers ------------------------------------------------------------------------


def test_classification_accuracy_picks_the_higher_scoring_answer():
    tok = tiny_tokenizer()
    rows = [{"label": i % 2, "sentence": w} for i, w in enumerate(["good", "good", "bad", "dull", "film"])]
    rows.append({"label": 9, "sentence": "good"})  # malformed: skipped
    positive = tok.token_to_id("positive")

    def score(groups):  # "good" favours positive, everything else negative
        return [[float((tok.token_to_id("good") in prompt) == (positive in answer)) for answer in answers]
                for prompt, answers in groups]

    result = classification_accuracy(rows, sst2(), tok, score)
    assert result.predictions == (1, 1, 0, 0, 0) and result.skipped == 1
    assert (result.correct, result.total) == (3, 5) and result.accuracy == pytest.approx(0.6)
    assert result.golds == (0, 1, 0, 1, 0) and result.correct_rows == "01101"
    # the right answers' scores: 1 for rows 0, 1 (good -> positive) and 3 (dull -> negative), 0 for 2 and 4
    assert result.gold_log_likelihood == 3.0 and result.gold_tokens == 10  # answer word + EOS per row


def test_math_exact_match_uses_the_extractor():
    tok = tiny_tokenizer()
    rows = [
        {"question": "How many ?", "answer": "#### 1,000"},
        {"question": "How many ?", "answer": "#### 5"},
        {"question": "How many ?", "answer": "#### -2"},
        {"question": "How many ?", "answer": "no number"},
    ]
    outputs = iter(["so #### $1000.00", "#### 6", "I think -2"])
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return [next(outputs) for _ in prompts]

    result = math_exact_match(rows, gsm8k(), tok, generate, batch_size=2)
    assert seen[0] == (1, *ids(tok, "Question: How many ?\nAnswer:"))
    assert result.predictions == ("1000", "6", None)
    assert result.golds == ("1000", "5", "-2") and result.correct_rows == "100"
    assert (result.correct, result.total, result.skipped) == (1, 3, 1)
    assert result.answered == 2 / 3  # "I think -2" is right but gives no "#### <number>"


def test_scoring_with_masked_log_likelihood_matches_numpy():
    from hyjax.data import masked_log_likelihood

    tok = tiny_tokenizer()
    ex = sst2().resolve(["label", "sentence"]).example({"label": 0, "sentence": "dull"}, tok)
    batch = pad_batch([ex, ex], len(ex), tok.pad_id)
    logits = np.random.default_rng(0).normal(size=(*batch["tokens"].shape, tok.vocab_size)).astype(np.float32)
    got = np.asarray(masked_log_likelihood(logits, batch["targets"], batch["loss_mask"]))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(got, (picked * batch["loss_mask"]).sum(-1), rtol=1e-5)


# ---- the whole pipeline ------------------------------------------------------------------------


def test_prepare_reads_holds_out_and_batches(tmp_path):
    from hyjax.data import DataConfig, prepare

    path = tmp_path / "reviews.tsv"
    path.write_text("label\tcontent\n" + "".join(f"{i % 2}\t{'good' if i % 2 else 'bad'} movie\n" for i in range(40)))
    config = DataConfig(path=str(path), task="sst2", eval_count=8, max_length=32, bucket=8, shuffle_seed=1)
    data = prepare(config, tiny_tokenizer(), global_batch_size=4, process_index=0, process_count=1,
                   cache_dir=str(tmp_path / "c"))
    assert len(data.eval_rows) == 8 and data.report.examples == 32 and data.train.steps_per_epoch() == 8
    batch = next(data.train)
    assert batch["tokens"].shape == (4, 16) and batch["loss_mask"].sum() == 8  # answer word + EOS per row
    assert data.task.text_column == "content"
    result = classification_accuracy(data.eval_rows, data.task, tiny_tokenizer(),
                                     lambda groups: [[0.0] * len(answers) for _, answers in groups])
    assert result.total == 8


def test_data_config_errors_name_the_closest_choices():
    from hyjax.data import DataConfig

    with pytest.raises(ValueError, match=r"task='gsm8' must be one of \[.*\]; did you mean 'gsm8k'\?"):
        DataConfig(path="x", task="gsm8")
    with pytest.raises(ValueError, match=r"format='jsnl' must be one of \[.*\]; did you mean 'jsonl'\?"):
        DataConfig(path="x", format="jsnl")
    with pytest.raises(ValueError, match="verbalizer=.* only applies to task=classification"):
        DataConfig(path="x", task="math", verbalizer=((0, " no"),))


@pytest.mark.parametrize("task, cls, text, label, template", [
    ("sst2", "Classification", "text_column", "label_column", "T {text}"),
    ("gsm8k", "MathWordProblems", "question_column", "answer_column", "Q {question}"),
    ("instructions", "Instructions", "prompt_column", "completion_column", "P {prompt}"),
])
def test_make_task_maps_the_config_columns_onto_the_tasks_fields(task, cls, text, label, template):
    from hyjax.data import DataConfig, make_task

    made = make_task(DataConfig(path="x", task=task, text_column="in", label_column="out", template=template,
                                chat=False, system="be brief"))
    assert type(made).__name__ == cls
    assert (getattr(made, text), getattr(made, label), made.template) == ("in", "out", template)
    assert (made.prompt.chat, made.prompt.system) == (False, "be brief")
    default = make_task(DataConfig(path="x", task=task))
    assert default == type(made)()


def test_sst2_accuracy_with_a_tiny_model_scores_each_answer_by_its_log_likelihood():
    """Both scorers (each candidate alone; each prompt once through the KV cache) give every candidate's
    log-likelihood as an unpadded forward pass does, and so the same predictions."""
    import functools

    import jax

    from hyjax import model as M
    from hyjax.data import masked_log_likelihood
    from hyjax.evaluation import answer_log_likelihood, candidate_log_likelihoods

    tok = tiny_tokenizer()
    config = M.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2
    )
    params = M.init_params(config, jax.random.key(0))
    logits_fn = jax.jit(functools.partial(M.apply, config, params))
    per_candidate = answer_log_likelihood(logits_fn, tok.pad_id, max_length=64, bucket=16)
    prompt_once = functools.partial(candidate_log_likelihoods, config, params, pad_id=tok.pad_id, max_length=64,
                                    batch_size=3, bucket=16)
    words = ["good movie", "bad", "dull film", "witty", "a long and winding review of a film", "ok"]
    rows = [{"label": i % 2, "sentence": w} for i, w in enumerate(words)]
    task = sst2().resolve(["label", "sentence"])
    results = [classification_accuracy(rows, task, tok, score) for score in (per_candidate, prompt_once)]
    assert results[0].predictions == results[1].predictions
    np.testing.assert_allclose(results[0].gold_log_likelihood, results[1].gold_log_likelihood, rtol=1e-5)
    for row, predicted in zip(rows, results[1].predictions):
        candidates, _ = task.candidates(row, tok)
        alone = []
        for ex in candidates:  # each answer scored alone, unpadded
            batch = pad_batch([ex], len(ex), tok.pad_id)
            logits = M.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"])
            alone.append(float(masked_log_likelihood(logits, batch["targets"], batch["loss_mask"])[0]))
        group = [(candidates[0].prompt_ids, [c.answer_ids for c in candidates])]
        for score in (per_candidate, prompt_once):
            np.testing.assert_allclose(score(group)[0], alone, rtol=1e-4, atol=1e-5)
        assert predicted == int(np.argmax(alone))
    uneven = [((5, 6, 7), [(8,), (9, 10, 11)]), ((5,), [(12, 13), (8,)])]  # answers of different lengths
    np.testing.assert_allclose(prompt_once(uneven), per_candidate(uneven), rtol=1e-4, atol=1e-5)
