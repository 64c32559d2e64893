"""Models and data sets named by their Hugging Face Hub ids, resolved through `huggingface_hub`'s cache.

What `model.path` (and `--model`) takes, in the order `resolve_model` tries it:

    smollm2-135m-instruct                 a checkpoint hyjax fetches itself (`hyjax.pretrained`)
    ./model.gguf, /data/llama-hf          an existing local file or folder
    HuggingFaceTB/SmolLM2-135M-Instruct   a Hub model repository: its config, safetensors and tokenizer
    org/name@revision                     ... at a branch, tag or commit
    org/name/path/in/repo.gguf[@rev]      one GGUF file of a repository
    hf:org/name...                        the same, marked as a Hub name explicitly

What `data.path` and `data.eval_path` take besides local files: `hf:org/name[/config][:split][@revision]`,
e.g. `hf:stanfordnlp/sst2:validation`. The repository is fetched into the cache and read with
`datasets.load_dataset` on that local snapshot, so a Hub name and a local folder laid out like a dataset
repository (`hf:./my-dataset`) read alike.

Downloads go through huggingface_hub: its cache (`HF_HOME`, `HF_HUB_CACHE`), its token (`hf auth login`,
`HF_TOKEN`) and `HF_HUB_OFFLINE=1`, under which only the cache is read. A repository that is neither
cached nor reachable raises `HubError` naming the repository, the cache folder and the command that
fetches it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from hyjax import pretrained

HF_PREFIX = "hf:"
# The files of a model repository a run reads (weights, config, tokenizer); other files are not fetched.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"]
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_MODEL = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?P<file>(?:/[^@/]+)*/[^@/]+\.gguf)?(?:@(?P<revision>[^@\s]+))?")
_DATA = re.compile(rf"(?P<repo>{_NAME}/{_NAME}|\.{{0,2}}/[^:@]*)(?:/(?P<config>[^/:@]+))?"
                   rf"(?::(?P<split>[A-Za-z0-9_.\[\]%:-]+?))?(?:@(?P<revision>[^@\s]+))?")


class HubError(pretrained.PretrainedFetchError):
    """A Hub repository could not be found in the cache or fetched; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class HubModel:
    """A model on the Hub: a repository, optionally one GGUF file in it, at a revision (default: main)."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"/{self.filename}" if self.filename else "") + (
            f"@{self.revision}" if self.revision else "")


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """A data set on the Hub (or a local folder laid out like a dataset repository), its config and split."""

    repo_id: str
    config: str | None = None
    split: str | None = None
    revision: str | None = None

    @property
    def local(self) -> bool:
        return self.repo_id.startswith((".", "/"))


def parse_model(spec: str) -> HubModel | None:
    """The Hub model `spec` names, or None when it is a hyjax name or an existing local path.

    Raises ValueError for an `hf:` name that is not `org/name[/file.gguf][@revision]`.
    """
    explicit = spec.startswith(HF_PREFIX)
    if not explicit and (pretrained.is_known(spec) or pathlib.Path(spec).expanduser().exists()):
        return None
    match = _MODEL.fullmatch(spec.removeprefix(HF_PREFIX))
    if match is None:
        if explicit:
            raise ValueError(f"{spec!r} is not a Hub model name: write hf:org/name, hf:org/name@revision or "
                             "hf:org/name/file.gguf")
        return None
    file = match["file"]
    return HubModel(match["repo"], file.lstrip("/") if file else None, match["revision"])


def parse_dataset(spec: str) -> HubDataset | None:
    """The Hub data set `spec` (`hf:org/name[/config][:split][@revision]`) names, or None for a local path."""
    if not spec.startswith(HF_PREFIX):
        return None
    match = _DATA.fullmatch(spec.removeprefix(HF_PREFIX))
    if match is None:
        raise ValueError(f"{spec!r} is not a Hub data set name: write hf:org/name, with /config, :split and "
                         "@revision as needed (hf:nyu-mll/glue/sst2:validation)")
    return HubDataset(match["repo"], match["config"], match["split"], match["revision"])


def resolve_model(spec: str) -> pathlib.Path:
    """The local file or folder of a `model.path` value (see the module docstring), fetching it if needed.

    Raises FileNotFoundError for a local path that does not exist and is no Hub name, and HubError (a
    `PretrainedFetchError`) when a Hub repository is neither cached nor reachable.
    """
    if pretrained.is_known(spec):
        return pretrained.fetch(spec)
    model = parse_model(spec)
    if model is None:
        path = pathlib.Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{spec!r} does not exist: give a .gguf file, a Hugging Face or Orbax model "
                                    f"folder, a Hub name (org/name), or {pretrained.SMOLLM2_135M_INSTRUCT!r}")
        return path
    import huggingface_hub

    try:
        if model.filename is not None:
            return pathlib.Path(huggingface_hub.hf_hub_download(model.repo_id, model.filename,
                                                                revision=model.revision))
        folder = pathlib.Path(huggingface_hub.snapshot_download(model.repo_id, revision=model.revision,
                                                                allow_patterns=MODEL_FILES))
    except _hub_failures() as err:
        raise _hub_error(f"model {str(model)!r}", model.repo_id, model.revision, "model", err) from err
    if not (folder / "config.json").is_file():
        raise HubError(f"Hub repository {model.repo_id} has no config.json (at {folder}): name one of its "
                       "GGUF files instead (org/name/file.gguf) or give a local checkpoint")
    return folder


def dataset_folder(data: HubDataset) -> pathlib.Path:
    """The local snapshot of a Hub data set's repository (a local dataset folder as it is)."""
    if data.local:
        folder = pathlib.Path(data.repo_id).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder {folder} does not exist")
        return folder
    import huggingface_hub

    try:
        return pathlib.Path(huggingface_hub.snapshot_download(data.repo_id, repo_type="dataset",
                                                              revision=data.revision))
    except _hub_failures() as err:
        raise _hub_error(f"data set {data.repo_id!r}", data.repo_id, data.revision, "dataset", err) from err


def _hub_failures() -> tuple[type[Exception], ...]:
    """What the Hub client raises for a repository it cannot give: not cached, offline (both OSErrors),
    unknown or gated repository, revision or file (HTTP errors, OSErrors too), network failures, an
    invalid id."""
    from huggingface_hub import errors

    return OSError, errors.EntryNotFoundError, errors.HFValidationError


def _hub_error(what: str, repo_id: str, revision: str | None, repo_type: str, err: Exception) -> HubError:
    from huggingface_hub import constants

    at = f" --revision {revision}" if revision else ""
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    offline = ("HF_HUB_OFFLINE is set, so only the cache is read" if constants.is_offline_mode()
               else "the Hub could not be reached or refused the request")
    return HubError(f"{what} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and {offline} "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Fetch it where the "
                    f"Hub is reachable with `hf download {repo_id}{kind}{at}` (same HF_HOME) and copy the cache "
                    "folder here, log in with `hf auth login` for a gated or private repository, or give a local "
                    "path")
