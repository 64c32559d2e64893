"""Tokenizers against independent implementations: transformers' GGUF and Llama tokenizers, sentencepiece."""

from __future__ import annotations

import json
import pathlib

import gguf
import pytest
import sentencepiece
import tokenizers

from hyjax.weights.gguf_reader import read_gguf_metadata
from hyjax.tokenization import (
    BUILTIN_CHAT_TEMPLATES,
    SentencePieceTokenizer,
    builtin_chat_template,
    load_tokenizer,
    render_chat_template,
    tokenizer_from_gguf_metadata,
)

transformers = pytest.importorskip("transformers")

TRICKY = [
    "Hello 12345 world",
    "price: $3.50, 1,000,000 items (approx. 2024-11-23)",
    "  two leading spaces",
    " one leading space",
    "emoji 😀👍🏽 ok",
    "line1\nline2\n\n\tTabbed\r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "a<|im_start|>b",
    "naïve café — “quotes” ñ",
    "don't I'll we're THEY'RE",
    "中文 日本語 한국어",
    "trailing   ",
    "",
]

TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
]
WITH_SYSTEM = [{"role": "system", "content": "You answer in one word."}, *TWO_TURNS]


def _sst2(shared_data: pathlib.Path, split: str, count: int) -> list[str]:
    rows = (shared_data / "sst2" / split).read_text(encoding="utf-8").splitlines()[1 : count + 1]
    return [row.split("\t", 1)[1].strip() for row in rows]


@pytest.fixture(scope="module")
def sentences(shared_data) -> list[str]:
    """300 SST-2 validation sentences."""
    return _sst2(shared_data, "dev.tsv", 300)


@pytest.fixture(scope="module")
def smol_fields(smollm2_gguf) -> dict:
    return read_gguf_metadata(smollm2_gguf)


@pytest.fixture(scope="module")
def smol(smol_fields):
    return tokenizer_from_gguf_metadata(smol_fields)


@pytest.fixture(scope="module")
def hf_smol(smollm2_gguf):
    """transformers' own tokenizer built from the same GGUF."""
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def _write_tokenizer_gguf(path: pathlib.Path, fields: dict, **overrides) -> pathlib.Path:
    """A GGUF holding only tokenizer metadata (no tensors), from `fields` with `overrides`."""
    kv = {**fields, **overrides}
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(kv["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(kv["tokenizer.ggml.pre"])
    writer.add_token_list(kv["tokenizer.ggml.tokens"])
    writer.add_token_types(kv["tokenizer.ggml.token_type"])
    writer.add_token_merges(kv["tokenizer.ggml.merges"])
    writer.add_bos_token_id(kv["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(kv["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(kv["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(kv["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- GGUF byte-level BPE ---------------------------------------------------------------------


def test_gguf_special_tokens(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.unk_id) == (1, 2, 2, 0)
    assert smol.id_to_token(1) == "<|im_start|>" and smol.id_to_token(2) == "<|im_end|>"
    assert smol.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert smol.add_bos_default is False
    assert smol.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert smol.encode("hi", add_bos=True) == [1, 6004]
    assert smol.token_to_id("Ġthe") is not None and smol.token_to_id("no such token") is None


def test_gguf_ids_match_transformers(smol, hf_smol, sentences):
    texts = sentences + TRICKY
    mismatches = [(t, smol.encode(t), hf_smol.encode(t)) for t in texts if smol.encode(t) != hf_smol.encode(t)]
    assert not mismatches, mismatches[:3]


def test_gguf_decode_round_trip(smol, hf_smol, sentences):
    for text in sentences + TRICKY:
        ids = smol.encode(text)
        assert smol.decode(ids, skip_special_tokens=False) == text
        assert smol.decode(ids) == hf_smol.decode(ids, skip_special_tokens=True)
    assert smol.decode(smol.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_gguf_chat_template_matches_transformers(smol, hf_smol):
    for messages in (TWO_TURNS, WITH_SYSTEM):
        for add_generation_prompt in (True, False):
            ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            theirs = hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours == theirs
    assert smol.apply_chat_template(TWO_TURNS) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The built-in "chatml" is SmolLM2's template.
    assert smol.with_chat_template(builtin_chat_template("chatml")).apply_chat_template(WITH_SYSTEM) == (
        smol.apply_chat_template(WITH_SYSTEM)
    )


def test_gguf_save_hf_loads_in_transformers_and_back(smol, sentences, tmp_path):
    folder = smol.save_hf(tmp_path / "smol")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    for text in sentences[:100] + TRICKY:
        expected = smol.encode(text)
        assert theirs.encode(text) == expected
        assert ours.encode(text) == expected
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (1, 2, 2, 0)
    assert ours.add_bos_default is False and ours.stop_ids == smol.stop_ids
    assert ours.chat_template == smol.chat_template
    rendered = theirs.apply_chat_template(WITH_SYSTEM, tokenize=False, add_generation_prompt=True)
    assert rendered == smol.apply_chat_template(WITH_SYSTEM)


def test_gguf_llama_bpe_with_bos_matches_transformers(smol_fields, sentences, tmp_path):
    """LLaMA-3's split regex and BOS on: our tokenizer, transformers' GGUF tokenizer and our HF export agree."""
    overrides = {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": True}
    path = _write_tokenizer_gguf(tmp_path / "llama_bpe.gguf", smol_fields, **overrides)
    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    exported = ours.save_hf(tmp_path / "exported")
    reloaded = transformers.AutoTokenizer.from_pretrained(exported)
    raw = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
    for text in sentences[:100] + TRICKY:
        ids = ours.encode(text)
        assert ids[0] == 1 and ids[1:] == ours.encode(text, add_bos=False)
        assert theirs.encode(text) == ids
        assert reloaded.encode(text) == ids
        assert raw.encode(text).ids == ids
    # The LLaMA-3 split keeps up to three digits together and a letter run after punctuation.
    assert [w for w, _ in ours.backend.pre_tokenizer.pre_tokenize_str("12345 x:y")] == ["123", "45", "Ġx", ":y"]


def test_smollm_pre_tokenizer_splits_digits(smol):
    assert [w for w, _ in smol.backend.pre_tokenizer.pre_tokenize_str("12345 x:y")] == [
        "1", "2", "3", "4", "5", "Ġx", ":", "y"
    ]


def test_load_tokenizer_gguf_path(smollm2_gguf, smol):
    loaded = load_tokenizer(smollm2_gguf, chat_template="zephyr")
    assert loaded.encode(TRICKY[0]) == smol.encode(TRICKY[0])
    assert loaded.chat_template == builtin_chat_template("zephyr")
    assert smol.chat_template != loaded.chat_template  # the original is untouched


# ---- sentencepiece ---------------------------------------------------------------------------


def _train_spm(shared_data, folder: pathlib.Path, **options) -> pathlib.Path:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sst2(shared_data, "train.tsv", 3000)),
        model_prefix=str(folder / "m"),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
        **options,
    )
    return folder / "m.model"


@pytest.fixture(scope="module")
def llama_style_spm(shared_data, tmp_path_factory) -> pathlib.Path:
    """A small LLaMA-style model: BPE, byte fallback, no normalization, split digits."""
    return _train_spm(
        shared_data,
        tmp_path_factory.mktemp("spm"),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
    )


def test_sentencepiece_matches_processor(llama_style_spm, sentences):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(llama_style_spm))
    tok = load_tokenizer(llama_style_spm)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (1, 2, 0, 500)
    assert tok.pad_id == 2 and tok.add_bos_default is True and tok.stop_ids == {2}
    for text in sentences + [t for t in TRICKY if "<|" not in t]:
        assert tok.encode(text) == [1, *processor.encode(text)]
        assert tok.encode(text, add_bos=False) == processor.encode(text)
        assert tok.decode(tok.encode(text)) == processor.decode(processor.encode(text))
    # Control tokens in the text are one id each; the text between them is encoded piece by piece.
    assert tok.encode("hi</s><s>there", add_bos=False) == [*processor.encode("hi"), 2, 1, *processor.encode("there")]
    assert tok.decode([1, *processor.encode("hi"), 2], skip_special_tokens=False) == "<s>hi</s>"


def test_sentencepiece_save_hf_matches_transformers(llama_style_spm, sentences, tmp_path):
    tok = load_tokenizer(llama_style_spm, chat_template="zephyr")
    folder = tok.save_hf(tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(theirs).__name__ == "LlamaTokenizer"
    # transformers adds no dummy prefix to text that already starts with a space (sentencepiece
    # does), so texts with a leading space are left out here.
    texts = sentences + [t for t in TRICKY if not t.startswith(" ") and "<|" not in t] + ["a</s><s>b"]
    for text in texts:
        assert theirs.encode(text) == tok.encode(text)
        assert theirs.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text))
    reloaded = load_tokenizer(folder)
    assert isinstance(reloaded, SentencePieceTokenizer)
    assert reloaded.encode(texts[0]) == tok.encode(texts[0])
    assert reloaded.chat_template == builtin_chat_template("zephyr")
    rendered = theirs.apply_chat_template(WITH_SYSTEM, tokenize=False, add_generation_prompt=True)
    assert rendered == reloaded.apply_chat_template(WITH_SYSTEM)


def test_sentencepiece_save_hf_refuses_normalizing_model(shared_data, tmp_path):
    tok = load_tokenizer(_train_spm(shared_data, tmp_path))  # default nmt_nfkc normalization
    with pytest.raises(ValueError, match="normalization_rule_name='nmt_nfkc'"):
        tok.save_hf(tmp_path / "hf")


# ---- tokenizer.json --------------------------------------------------------------------------


def test_tokenizer_json_bos_from_post_processor(smol, tmp_path):
    """A tokenizer.json whose post-processor adds BOS, with a config that names it: BOS on by default."""
    backend = tokenizers.Tokenizer.from_str(smol.backend.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos_default is True and tok.pad_id == tok.eos_id == 2
    assert tok.encode("hi") == [1, 6004] and tok.encode("hi", add_bos=False) == [6004]
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template(TWO_TURNS)


# ---- built-in chat templates -----------------------------------------------------------------


def _render(name: str, messages, add_generation_prompt=True) -> str:
    return render_chat_template(
        builtin_chat_template(name),
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token="<BOS>",
        eos_token="<EOS>",
    )


def test_builtin_chatml():
    assert _render("chatml", WITH_SYSTEM[:2], add_generation_prompt=False) == (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    )


def test_builtin_zephyr():
    assert _render("zephyr", WITH_SYSTEM) == (
        "<|system|>\nYou answer in one word.<EOS>\n<|user|>\nWhat is 2 + 2?<EOS>\n<|assistant|>\n4.<EOS>\n"
        "<|user|>\nAnd 3 + 3?<EOS>\n<|assistant|>\n"
    )


def test_builtin_llama2():
    assert _render("llama2", WITH_SYSTEM) == (
        "<BOS>[INST] <<SYS>>\nYou answer in one word.\n<</SYS>>\n\nWhat is 2 + 2? [/INST] 4. <EOS>"
        "<BOS>[INST] And 3 + 3? [/INST]"
    )
    assert _render("llama2", TWO_TURNS[:1]) == "<BOS>[INST] What is 2 + 2? [/INST]"
    with pytest.raises(Exception, match="roles must alternate"):
        _render("llama2", [TWO_TURNS[0], TWO_TURNS[0]])


def test_builtin_llama3():
    assert _render("llama3", WITH_SYSTEM[:2]) == (
        "<BOS><|start_header_id|>system<|end_header_id|>\n\nYou answer in one word.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_builtin_unknown_name():
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'.*chatml.*llama2.*llama3.*zephyr"):
        builtin_chat_template("vicuna")
    assert sorted(BUILTIN_CHAT_TEMPLATES) == ["chatml", "llama2", "llama3", "zephyr"]


# ---- errors ----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf does not exist"):
        load_tokenizer(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match=r"holds none of \['tokenizer.json', 'tokenizer.model'\]"):
        load_tokenizer(tmp_path)


def test_unknown_suffix(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="suffix '.txt'"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_unsupported_pre_tokenizer(smol_fields):
    with pytest.raises(ValueError, match="tokenizer.ggml.pre = 'qwen2' is not supported.*'llama-bpe'.*'smollm'"):
        tokenizer_from_gguf_metadata({**smol_fields, "tokenizer.ggml.pre": "qwen2"})


def test_non_gpt2_gguf_vocabulary(smol_fields, tmp_path):
    small = {k: v[:20] if isinstance(v, list) else v for k, v in smol_fields.items()}
    path = _write_tokenizer_gguf(tmp_path / "spm.gguf", small, **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model = 'llama' is not supported; only 'gpt2'"):
        load_tokenizer(path)


def test_unknown_chat_template_argument(tmp_path, llama_style_spm):
    with pytest.raises(ValueError, match="unknown chat template 'chat-ml'"):
        load_tokenizer(llama_style_spm, chat_template="chat-ml")
