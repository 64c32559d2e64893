"""Shared pytest fixtures: the real SmolLM2-135M-Instruct checkpoint and the shared data folder."""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Deviceless TPU compilation never touches a TPU: let several test processes load libtpu at once
# instead of failing on its single-process lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# jax's CPU linear algebra (LU, QR, SVD) runs in scipy's OpenBLAS, which picks its kernels by CPU model and
# its threads by core count; their last bits differ (one ulp in LoRA-GA's start-up factors, BOFT's Cayley
# solve) and a few Adam steps at the tests' learning rates make that a 0.5% loss difference. Pinned, the
# steps recorded in tests/fixtures reproduce on every x86-64 machine.
os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """Path of the real SmolLM2-135M-Instruct GGUF (fetched once into the user cache)."""
    from hyjax import pretrained

    return pretrained.smollm2_135m_instruct()


@pytest.fixture
def peft_butterfly(monkeypatch):
    """HF PEFT's BOFT with m > 1 on CPU: PEFT needs its CUDA extension `fbd_cuda` for the block-diagonal
    assembly and otherwise forces m = 1; this stands in for it (forward only) with `torch.block_diag`."""
    torch = pytest.importorskip("torch")
    boft_layer = pytest.importorskip("peft.tuners.boft.layer")

    class BlockDiag:
        @staticmethod
        def forward(blocks):
            return (torch.stack([torch.block_diag(*blocks[n]) for n in range(blocks.shape[0])]),)

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", BlockDiag)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared data folder (SST-2, GSM8K); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


# A tiny LLaMA with the real SmolLM2 tokenizer (its 49,152-token vocabulary): real checkpoint and
# tokenizer files, steps in milliseconds.
TINY_TRAIN_CONFIG = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, tie_embeddings=True, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_gguf) -> pathlib.Path:
    """A Hugging Face folder: a randomly initialised tiny LLaMA and SmolLM2-135M-Instruct's tokenizer."""
    import jax

    from hyjax import model
    from hyjax.weights import save_hf_checkpoint
    from hyjax.tokenization import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    config = model.LlamaConfig(**TINY_TRAIN_CONFIG, bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.eos_id)
    params = model.init_params(config, jax.random.key(0))
    return save_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "model", config, params, tokenizer=tokenizer)


_GOOD = ["wonderful", "moving", "brilliant", "charming", "delightful", "sharp", "warm", "gripping"]
_BAD = ["dull", "tedious", "clumsy", "lifeless", "boring", "shallow", "messy", "forgettable"]
_NOUNS = ["film", "story", "cast", "script", "performance", "ending", "soundtrack", "direction"]


def sentiment_rows(count: int, seed: int) -> list[tuple[str, int]]:
    """SST-2-like (sentence, label) rows whose label follows the adjectives."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        words = _GOOD if label else _BAD
        rows.append((f"the {rng.choice(_NOUNS)} is {rng.choice(words)} and {rng.choice(words)}", label))
    return rows


def write_sentiment_tsv(path: pathlib.Path, count: int, seed: int) -> pathlib.Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in sentiment_rows(count, seed)))
    return path


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory) -> dict[str, pathlib.Path]:
    """`{"train": tsv, "dev": tsv}` in SST-2's layout (sentence, label)."""
    folder = tmp_path_factory.mktemp("sentiment")
    return {"train": write_sentiment_tsv(folder / "train.tsv", 256, 0),
            "dev": write_sentiment_tsv(folder / "dev.tsv", 32, 1)}
