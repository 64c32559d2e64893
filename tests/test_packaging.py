"""What a plain, non-editable `pip install .` carries: the configs and the bundled SST-2 sample, found from
any working directory, and the commands' help; the sample is what its ORIGIN.md says."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from hyjax import bundled
from hyjax.data import load_rows

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _whole_sentence(line: str) -> bool:
    """ORIGIN.md's rule for the training sample: at least 8 words, ending in `.`, `!` or `?`."""
    text = line.split("\t", 1)[1].rstrip()
    return text.endswith((".", "!", "?")) and len(text.split()) >= 8


def test_the_bundled_sample_is_what_its_origin_says(shared_data):
    train = bundled.resolve("bundled:sst2/train.tsv").read_text().splitlines()
    source = (shared_data / "sst2" / "train.tsv").read_text().splitlines()
    assert train == source[:1] + [line for line in source[1:] if _whole_sentence(line)][:2000]
    dev = bundled.resolve("bundled:sst2/dev.tsv").read_text().splitlines()
    assert dev == (shared_data / "sst2" / "dev.tsv").read_text().splitlines()[:501]
    assert len(load_rows("bundled:sst2/dev.tsv")) == 500
    with pytest.raises(FileNotFoundError, match=r"bundled: \[.*'bundled:sst2/dev.tsv', 'bundled:sst2/train.tsv'\]"):
        bundled.resolve("bundled:sst2/test.tsv")
    with pytest.raises(FileNotFoundError, match="not a data file shipped"):
        bundled.resolve("bundled:../configs/base.yaml")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> pathlib.Path:
    """The project built as a wheel and installed (without dependencies) into a folder of its own."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(folder / "dist"), str(PROJECT_ROOT)], check=True, timeout=600)
    (wheel,) = (folder / "dist").glob("hyjax-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder / "site"),
                    str(wheel)], check=True, timeout=600)
    return folder / "site"


def test_an_installed_wheel_runs_the_quickstart_from_any_directory(installed_wheel, tiny_checkpoint, tmp_path):
    """From a folder outside the project, the wheel's own copy of hyjax resolves `quickstart` and its
    bundled data and trains (a tiny model in place of SmolLM2 keeps it short)."""
    env = {**os.environ, "PYTHONPATH": str(installed_wheel), "JAX_PLATFORMS": "cpu"}
    env.pop("HYJAX_CONFIGS", None)
    where = subprocess.run([sys.executable, "-c", "import hyjax.config as c; print(c.configs_dir())"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert pathlib.Path(where) == installed_wheel / "hyjax" / "configs"
    assert not pathlib.Path(where).is_symlink() and (pathlib.Path(where) / "methods" / "hybrid.yaml").is_file()
    for command in ("hyjax.train", "hyjax.eval"):
        shown = subprocess.run([sys.executable, "-m", command, "--help"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
        assert shown.returncode == 0 and f"python -m {command}" in shown.stdout, shown.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "hyjax.train", "quickstart", "model.preset=null",
                          f"model.path={tiny_checkpoint}", "train.steps=2", "train.warmup_steps=1",
                          "eval.num_examples=8", "eval.generation_samples=0", "logging.progress_bar=false",
                          "logging.output_dir=run", "export.merged_model=false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["eval_after"]["examples"] == 8
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "path: bundled:sst2/train.tsv" in resolved and "method:\n  name: hybrid" in resolved
