"""Hub names for models and data sets, resolved offline through a cache in huggingface_hub's real snapshot
layout that the tests write (blobs, snapshots linking to them, refs), so nothing but the cache can answer."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import constants

from hyjax import hub
from hyjax.config import load_config
from hyjax.data import load_rows
from hyjax.training import train

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_hub_snapshot(cache: pathlib.Path, repo_id: str, files: dict[str, pathlib.Path], *, repo_type="model",
                       refs=("main",)) -> pathlib.Path:
    """Puts `files` (path in the repository -> local file) into `cache` as huggingface_hub lays out a
    download: content-addressed blobs, a snapshot folder of relative links named by a commit hash, and
    refs naming that commit. Returns the snapshot folder."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr(sorted((name, str(src)) for name, src in files.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty Hugging Face cache, with the Hub client offline (it raises on any request)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_names_are_parsed_and_local_paths_are_left_alone(tmp_path, monkeypatch):
    assert hub.parse_model("HuggingFaceTB/SmolLM2-135M-Instruct") == hub.HubModel("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.parse_model("org/name@v1.0") == hub.HubModel("org/name", revision="v1.0")
    assert hub.parse_model("hf:org/name-GGUF/q/model.Q8_0.gguf@abc") == hub.HubModel("org/name-GGUF",
                                                                                     "q/model.Q8_0.gguf", "abc")
    assert hub.parse_model("smollm2-135m-instruct") is None
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.parse_model("org/name") is None  # an existing folder wins over the Hub name it looks like
    assert hub.parse_model("./missing/model.gguf") is None
    with pytest.raises(ValueError, match="not a Hub model name"):
        hub.parse_model("hf:just-a-name")
    assert hub.parse_dataset("hf:nyu-mll/glue/sst2:validation@main") == hub.HubDataset("nyu-mll/glue", "sst2",
                                                                                        "validation", "main")
    assert hub.parse_dataset("hf:./my-data:train") == hub.HubDataset("./my-data", None, "train")
    assert hub.parse_dataset("train.tsv") is None
    with pytest.raises(ValueError, match="not a Hub data set name"):
        hub.parse_dataset("hf:only")


def test_a_hub_model_resolves_from_the_cache_offline(tiny_checkpoint, offline_cache):
    files = {p.name: p for p in tiny_checkpoint.iterdir()}
    snapshot = write_hub_snapshot(offline_cache, "org/tiny", files, refs=("main", "v1"))
    for spec in ("org/tiny", "hf:org/tiny", "org/tiny@v1", f"org/tiny@{snapshot.name}"):
        assert hub.resolve_model(spec) == snapshot, spec
    gguf_snapshot = write_hub_snapshot(offline_cache, "org/tiny-GGUF", {"q8/tiny.gguf": files["config.json"]})
    assert hub.resolve_model("org/tiny-GGUF/q8/tiny.gguf") == gguf_snapshot / "q8" / "tiny.gguf"


def test_offline_and_not_cached_says_which_repository_where_and_how_to_fetch_it(offline_cache):
    with pytest.raises(hub.HubError) as info:
        hub.resolve_model("org/absent@v2")
    message = str(info.value)
    assert "'org/absent@v2'" in message and str(offline_cache) in message and "HF_HUB_OFFLINE" in message
    assert "hf download org/absent --revision v2" in message
    with pytest.raises(hub.HubError, match="hf download org/absent-data --repo-type dataset"):
        load_rows("hf:org/absent-data:train")
    with pytest.raises(FileNotFoundError, match="a Hub name"):
        hub.resolve_model("./no/such/model.gguf")


@pytest.fixture
def sst2_like_repository(tmp_path, sentiment_data) -> pathlib.Path:
    """A local folder laid out like a dataset repository: data/train.parquet and data/validation.parquet."""
    folder = tmp_path / "sst2-repo"
    for split, source in (("train", sentiment_data["train"]), ("validation", sentiment_data["dev"])):
        rows = load_rows(source)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        rows.dataset.map(lambda row: {"label": int(row["label"])}).to_parquet(str(folder / "data" / f"{split}.parquet"))
    return folder


def test_a_hub_data_set_reads_its_splits_from_the_cache_offline(sst2_like_repository, offline_cache, sentiment_data):
    files = {f"data/{p.name}": p for p in (sst2_like_repository / "data").iterdir()}
    write_hub_snapshot(offline_cache, "org/sst2", files, repo_type="dataset")
    validation = load_rows("hf:org/sst2:validation")
    expected = load_rows(sentiment_data["dev"])
    assert [r["sentence"] for r in validation] == [r["sentence"] for r in expected]
    assert [r["label"] for r in validation] == [int(r["label"]) for r in expected]
    assert len(load_rows("hf:org/sst2", split="train")) == len(load_rows(sentiment_data["train"]))
    with pytest.raises(ValueError, match=r"holds splits \['train', 'validation'\]; name one, e.g. hf:org/sst2:train"):
        load_rows("hf:org/sst2")
    local = load_rows(f"hf:{sst2_like_repository}:validation")
    assert [r["sentence"] for r in local] == [r["sentence"] for r in expected]


def test_a_run_trains_from_hub_names(tiny_checkpoint, sst2_like_repository, offline_cache, tmp_path):
    write_hub_snapshot(offline_cache, "org/tiny", {p.name: p for p in tiny_checkpoint.iterdir()})
    data_files = {f"data/{p.name}": p for p in (sst2_like_repository / "data").iterdir()}
    write_hub_snapshot(offline_cache, "org/sst2", data_files, repo_type="dataset")
    config = load_config(None, [
        "model.preset=null", "model.path=org/tiny", "data.path=hf:org/sst2:train",
        "data.eval_path=hf:org/sst2:validation",
        "data.chat=false", "data.max_length=32", "data.bucket=16", "train.steps=2", "train.global_batch_size=4",
        "checkpoint.every_steps=0", "eval.num_examples=8", "eval.generation_samples=0", "eval.before_training=false",
        f"logging.output_dir={tmp_path / 'run'}", "logging.progress_bar=false", "method.name=lora"])
    result = train(config, log=lambda text: None)
    assert result.setup.model_path.is_relative_to(offline_cache)
    assert result.summary["eval_after"]["examples"] == 8
    adapter_config = (tmp_path / "run" / "export" / "peft_adapter" / "adapter_config.json").read_text()
    assert '"base_model_name_or_path": "org/tiny"' in adapter_config


def test_the_command_line_answers_an_uncached_hub_model_in_one_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "hyjax.generate", "--model", "org/not-here", "--prompt", "hi"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "org/not-here" in lines[0] and str(tmp_path / "hf" / "hub") in lines[0], done.stderr

