"""A generated set of bad inputs to hyjax's commands: configs, data files, checkpoints, resumed runs and
TPU topologies. Each must be answered by one line on stderr and exit code 2, before any compile or
download, without a traceback and without changing a checkpoint (tests/test_bad_inputs.py; counted in
bench/reliability.py).

A `BadInput` builds its command line in a scratch folder (`Workspace`): the configs are generated from
`RunConfig`'s fields (a value of the wrong type for every key, a negative number for every integer, a
non-finite number for every float, a made-up word for every key that takes one of a few names, a
misspelled key in every section) and the files by damaging the tiny test checkpoint and data.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
import shutil
import struct
import types
import typing
from typing import Callable

from hyjax.config import RunConfig
from hyjax.config.typed import field_types, is_section


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Where a case writes its files, and the good inputs it starts from."""

    folder: pathlib.Path  # empty, the case's own
    checkpoint: pathlib.Path  # the tiny model's Hugging Face folder (never modified: cases copy it)
    train: pathlib.Path  # a good training TSV (sentence, label)
    dev: pathlib.Path
    finished_run: pathlib.Path  # a finished lora run's folder (cases copy it before resuming it)
    finished_overrides: tuple[str, ...]  # the overrides that ran it


@dataclasses.dataclass(frozen=True)
class BadInput:
    """One bad input: `build(workspace)` writes what it needs and returns the command's arguments."""

    kind: str  # config | data | checkpoint | resume | topology
    name: str
    build: Callable[[Workspace], list[str]]
    command: str = "train"  # train | plan
    mentions: tuple[str, ...] = ()  # what the message must name (a key, a file, a column, a step)
    run_folder: bool = False  # the case resumes a copy of the finished run: its checkpoints must not change

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


def base_overrides(ws: Workspace, *extra: str) -> list[str]:
    """A good tiny run of two steps (the same settings as tests/test_train_run.py's tiny runs)."""
    return ["base", "model.preset=null", f"model.path={ws.checkpoint}", f"data.path={ws.train}",
            f"data.eval_path={ws.dev}", "data.chat=false", "data.max_length=32", "data.bucket=16", "train.steps=2",
            "train.global_batch_size=4", "checkpoint.every_steps=0", "eval.num_examples=4",
            "eval.generation_samples=0", f"logging.output_dir={ws.folder / 'run'}", "logging.progress_bar=false",
            "export.peft_adapter=false", *extra]


# ---------------------------------------------------------------------------------------------- configs

def config_leaves(cls=RunConfig, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """`(dotted key, type)` of every leaf field of the run config."""
    leaves = []
    for name, tp in field_types(cls).items():
        if is_section(tp):
            leaves += config_leaves(tp, f"{prefix}{name}.")
        else:
            leaves.append((f"{prefix}{name}", tp))
    return leaves


def _accepts(tp, kind) -> bool:
    """Whether the (possibly optional or union) type `tp` takes values of `kind` (int, float, ...)."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(option is kind or typing.get_origin(option) is kind for option in options)


def _wrong_type(tp) -> str:
    """A YAML value that no field of type `tp` takes."""
    if _accepts(tp, tuple):
        return "{a: 1}"
    if _accepts(tp, dict):
        return "[1, 2]"
    if _accepts(tp, str) or _accepts(tp, bool):
        return "[1, 2]"
    if _accepts(tp, int) or _accepts(tp, float):
        return "many"
    raise AssertionError(f"no wrong value for {tp}")


# Keys whose values are free text, a path, or a name looked up in the data (tried among the data cases):
# a made-up word is not wrong as such.
FREE_TEXT = {"data.template", "data.system", "logging.output_dir", "checkpoint.dir", "model.path",
             "model.tokenizer", "data.path", "data.eval_path", "data.split", "data.text_column",
             "data.label_column"}


def _override_case(key: str, value: str, name: str) -> BadInput:
    return BadInput("config", name, lambda ws: base_overrides(ws, f"{key}={value}"), mentions=(key.split(".")[-1],))


def _config_file_case(key: str, value: str, name: str) -> BadInput:
    """`key: value` written in a config file (a command-line override of a text field takes any text)."""
    def build(ws: Workspace) -> list[str]:
        *sections, last = key.split(".")
        text = "".join(f"{'  ' * depth}{section}:\n" for depth, section in enumerate(sections))
        path = ws.folder / "config.yaml"
        path.write_text(f"{text}{'  ' * len(sections)}{last}: {value}\n")
        return [str(path), *(item for item in base_overrides(ws)[1:] if not item.startswith(f"{key}="))]
    return BadInput("config", name, build, mentions=(key.split(".")[-1],))


def config_cases() -> list[BadInput]:
    cases = []
    for key, tp in config_leaves():
        cases.append(_config_file_case(key, _wrong_type(tp), f"{key} of the wrong type"))
        if _accepts(tp, int) and not _accepts(tp, bool):
            cases.append(_override_case(key, "-7", f"{key} negative"))
        if _accepts(tp, float):
            cases.append(_override_case(key, ".nan", f"{key} not a number"))
            cases.append(_override_case(key, ".inf", f"{key} infinite"))
        if tp in (str, str | None) and key not in FREE_TEXT:
            cases.append(_override_case(key, "no_such_choice", f"{key} not one of its choices"))
    for section in sorted({key.split(".")[0] for key, _ in config_leaves()}):
        cases.append(_override_case(f"{section}.no_such_key", "1", f"unknown key in {section}"))
    cases += [
        _override_case("train.micro_batch_size", "3", "micro batch that does not divide the batch"),
        _override_case("mesh.fsdp", "3", "mesh larger than the devices"),
        _override_case("mesh.tensor", "2", "tensor axis without the devices"),
        _override_case("method.name", "lora_gaa", "misspelled method"),
        _override_case("method.settings.rank", "4", "settings given to a method that has none of its own"),
        BadInput("config", "LoRA rank above the weights' size",
                 lambda ws: base_overrides(ws, "method.name=lora", "method.lora.rank=100000"), mentions=("rank",)),
        BadInput("config", "BOFT block that does not divide the features",
                 lambda ws: base_overrides(ws, "method.name=boft", "method.boft.block_size=7"),
                 mentions=("block_size",)),
        _override_case("method.lora.targets", "[no_such_proj]", "targets that match no weight"),
        BadInput("config", "steps and epochs both null", lambda ws: base_overrides(ws, "train.steps=null"),
                 mentions=("steps",)),
        BadInput("config", "two config files", lambda ws: ["base", "quickstart", *base_overrides(ws)[1:]],
                 mentions=("config",)),
        BadInput("config", "missing config file", lambda ws: ["no/such/config.yaml", *base_overrides(ws)[1:]],
                 mentions=("no/such/config.yaml",)),
        BadInput("config", "config file of invalid YAML", _broken_yaml, mentions=("broken.yaml",)),
        BadInput("config", "config file that is a list", _list_yaml, mentions=("list.yaml",)),
        BadInput("config", "override without a key", lambda ws: base_overrides(ws, "=3"), mentions=("=3",)),
        BadInput("config", "override of a section by a number", lambda ws: base_overrides(ws, "train=3"),
                 mentions=("train",)),
    ]
    return cases


def _broken_yaml(ws: Workspace) -> list[str]:
    path = ws.folder / "broken.yaml"
    path.write_text("train:\n  steps: [1, 2\n")
    return [str(path), *base_overrides(ws)[1:]]


def _list_yaml(ws: Workspace) -> list[str]:
    path = ws.folder / "list.yaml"
    path.write_text("- train\n- steps\n")
    return [str(path), *base_overrides(ws)[1:]]


# ------------------------------------------------------------------------------------------------- data

def _data_file(name: str, content: bytes | str | Callable[[Workspace], bytes | str], key: str = "data.path"
               ) -> BadInput:
    """The file `name` holding `content` (or what it returns), given as `key`."""
    def build(ws: Workspace) -> list[str]:
        path = ws.folder / name
        data = content(ws) if callable(content) else content
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return base_overrides(ws, f"{key}={path}")
    return BadInput("data", f"{key}: {name.split('.')[0].replace('_', ' ')} ({name.split('.')[-1]})", build,
                    mentions=(name,))


def _good_rows(ws: Workspace) -> list[str]:
    return ws.train.read_text().splitlines()[1:]


def data_cases() -> list[BadInput]:
    files = [
        ("empty.tsv", ""),
        ("header_only.tsv", "sentence\tlabel\n"),
        ("blank_lines.tsv", "sentence\tlabel\n\n\n\n"),
        ("empty_texts.tsv", lambda ws: "sentence\tlabel\n" + "".join(f"\t{i % 2}\n" for i in range(40))),
        ("bad_labels.tsv", lambda ws: "sentence\tlabel\n" + "a review\tmaybe\n" * 40),
        ("labels_out_of_range.tsv", lambda ws: "sentence\tlabel\n" + "".join(f"a review\t{2 + i % 3}\n"
                                                                             for i in range(40))),
        ("invalid_utf8.tsv", lambda ws: b"sentence\tlabel\n" + b"\xff\xfe bad bytes\t1\n" * 40),
        ("huge_line.tsv", lambda ws: "sentence\tlabel\n" + "word " * 2_000_000 + "\t1\n"),
        ("one_column.tsv", lambda ws: "sentence\n" + "".join(row.split("\t")[0] + "\n" for row in _good_rows(ws))),
        ("wrong_columns.tsv", lambda ws: "review\tstars\n" + "\n".join(_good_rows(ws)) + "\n"),
        ("extra_tabs.tsv", lambda ws: "sentence\tlabel\n" + "".join(f"a\tb\tc\t{i % 2}\n" for i in range(40))),
        ("not_json.jsonl", "{this is not json\n" * 20),
        ("numbers_not_objects.jsonl", "5\n" * 20),
        ("missing_keys.jsonl", "".join(json.dumps({"text_of_it": "a review", "y": 1}) + "\n" for _ in range(20))),
        ("label_as_list.jsonl", "".join(json.dumps({"sentence": "a review", "label": [1]}) + "\n"
                                        for _ in range(20))),
        ("numbers_as_text.jsonl", "".join(json.dumps({"sentence": 12345, "label": 1}) + "\n" for _ in range(20))),
        ("empty.jsonl", ""),
        ("gzip_bytes.tsv", lambda ws: gzip.compress(ws.train.read_bytes())),
        ("binary_noise.parquet", bytes(range(256)) * 8),
        ("empty.parquet", b""),
        ("quoted_forever.csv", lambda ws: 'sentence,label\n"an unclosed quote,1\n' + "a,1\n" * 20),
        ("spreadsheet.xlsx", b"PK\x03\x04 not a table hyjax reads"),
    ]
    cases = [_data_file(name, content) for name, content in files]
    cases += [_data_file(name, content, "data.eval_path") for name, content in files[:8]]
    cases += [
        BadInput("data", "data.path a folder that is not a saved data set",
                 lambda ws: base_overrides(ws, f"data.path={ws.folder}"), mentions=("save_to_disk",)),
        BadInput("data", "data.path missing", lambda ws: base_overrides(ws, f"data.path={ws.folder / 'none.tsv'}"),
                 mentions=("none.tsv",)),
        BadInput("data", "text column that is not in the file",
                 lambda ws: base_overrides(ws, "data.text_column=review"), mentions=("review",)),
        BadInput("data", "label column that is not in the file",
                 lambda ws: base_overrides(ws, "data.label_column=stars"), mentions=("stars",)),
        BadInput("data", "template without the text field",
                 lambda ws: base_overrides(ws, "data.template='Review: {txt}'"), mentions=("template",)),
        BadInput("data", "verbalizer without the file's labels",
                 lambda ws: base_overrides(ws, "data.verbalizer=[[5, ' five'], [6, ' six']]"), mentions=("label",)),
        BadInput("data", "Hub data set offline and not cached",
                 lambda ws: base_overrides(ws, "data.path=hf:nobody/no_such_dataset"),
                 mentions=("nobody/no_such_dataset",)),
    ]
    return cases


# ------------------------------------------------------------------------------------------ checkpoints

def _damaged_checkpoint(name: str, damage: Callable[[pathlib.Path], None], mentions: tuple[str, ...] = ()
                        ) -> BadInput:
    def build(ws: Workspace) -> list[str]:
        copy = ws.folder / "model"
        shutil.copytree(ws.checkpoint, copy)
        damage(copy)
        return base_overrides(ws, f"model.path={copy}")
    return BadInput("checkpoint", name, build, mentions=mentions)


def _edit_config(**changes) -> Callable[[pathlib.Path], None]:
    def edit(folder: pathlib.Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _safetensors(folder: pathlib.Path) -> pathlib.Path:
    return next(folder.glob("*.safetensors"))


def _cut(fraction: float) -> Callable[[pathlib.Path], None]:
    def cut(folder: pathlib.Path) -> None:
        path = _safetensors(folder)
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
    return cut


def _edit_header(change: Callable[[dict], None]) -> Callable[[pathlib.Path], None]:
    """Rewrites the safetensors header (JSON after an 8-byte length), keeping the data as it is."""
    def edit(folder: pathlib.Path) -> None:
        path = _safetensors(folder)
        data = path.read_bytes()
        length = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + length])
        change(header)
        encoded = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])
    return edit


def _first_tensor(header: dict, suffix: str = "q_proj.weight") -> str:
    return next(name for name in sorted(header) if name.endswith(suffix))


def _drop_tensor(header: dict) -> None:
    header["model.renamed.weight"] = header.pop(_first_tensor(header))


def _reshape_tensor(header: dict) -> None:
    entry = header[_first_tensor(header)]
    entry["shape"] = [entry["shape"][0] // 2, entry["shape"][1] * 2]


def _retype_tensor(header: dict) -> None:
    header[_first_tensor(header)]["dtype"] = "I32"


def _overlapping_offsets(header: dict) -> None:
    entry = header[_first_tensor(header)]
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 10**9]


def _pickle_only(folder: pathlib.Path) -> None:
    _safetensors(folder).unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95pickled tensors, which run code when loaded")


def _gguf(name: str, content: Callable[[Workspace], bytes], mentions: tuple[str, ...] = ("model.gguf",)) -> BadInput:
    def build(ws: Workspace) -> list[str]:
        path = ws.folder / "model.gguf"
        path.write_bytes(content(ws))
        return base_overrides(ws, f"model.path={path}")
    return BadInput("checkpoint", name, build, mentions=mentions)


def _gguf_header(tensors: int, metadata: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, metadata)


def checkpoint_cases() -> list[BadInput]:
    return [
        _damaged_checkpoint("config.json missing", lambda f: (f / "config.json").unlink(), ("config.json",)),
        _damaged_checkpoint("config.json not JSON", lambda f: (f / "config.json").write_text("{hidden_size"),
                            ("config.json",)),
        _damaged_checkpoint("config.json a list", lambda f: (f / "config.json").write_text("[1, 2]"),
                            ("config.json",)),
        _damaged_checkpoint("hidden_size a word", _edit_config(hidden_size="big"), ("hidden_size",)),
        _damaged_checkpoint("hidden_size negative", _edit_config(hidden_size=-64), ("hidden_size",)),
        _damaged_checkpoint("heads that do not divide the width", _edit_config(num_attention_heads=5),
                            ("num_heads",)),
        _damaged_checkpoint("another architecture", _edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                            ("gpt2",)),
        _damaged_checkpoint("config larger than the weights", _edit_config(num_hidden_layers=7), ("layers",)),
        _damaged_checkpoint("safetensors cut at 1%", _cut(0.01), (".safetensors",)),
        _damaged_checkpoint("safetensors cut at half", _cut(0.5), (".safetensors",)),
        _damaged_checkpoint("safetensors header not JSON", lambda f: _safetensors(f).write_bytes(
            struct.pack("<Q", 12) + b"{not json at" + b"\0" * 64), (".safetensors",)),
        _damaged_checkpoint("safetensors header longer than the file", lambda f: _safetensors(f).write_bytes(
            struct.pack("<Q", 10**12) + b"{}"), (".safetensors",)),
        _damaged_checkpoint("safetensors empty", lambda f: _safetensors(f).write_bytes(b""), (".safetensors",)),
        _damaged_checkpoint("a tensor missing", _edit_header(_drop_tensor), ("q_proj",)),
        _damaged_checkpoint("a tensor of the wrong shape", _edit_header(_reshape_tensor), ("q_proj",)),
        _damaged_checkpoint("a tensor of the wrong dtype", _edit_header(_retype_tensor), ("q_proj",)),
        _damaged_checkpoint("a tensor past the end of the file", _edit_header(_overlapping_offsets), (".safetensors",)),
        _damaged_checkpoint("no safetensors file", lambda f: _safetensors(f).unlink(), ("safetensors",)),
        _damaged_checkpoint("a pickle-based pytorch_model.bin only", _pickle_only, ("pytorch_model.bin",)),
        _damaged_checkpoint("tokenizer missing", lambda f: [p.unlink() for p in f.glob("tokenizer*")],
                            ("tokenizer",)),
        _damaged_checkpoint("tokenizer.json not JSON", lambda f: (f / "tokenizer.json").write_text("{oops"),
                            ("tokenizer",)),
        _gguf("GGUF empty", lambda ws: b""),
        _gguf("GGUF wrong magic", lambda ws: b"GGML" + b"\0" * 60),
        _gguf("GGUF header only", lambda ws: _gguf_header(3, 2)),
        _gguf("GGUF version 99", lambda ws: b"GGUF" + struct.pack("<IQQ", 99, 0, 0)),
        _gguf("GGUF metadata cut", lambda ws: _gguf_header(1, 1) + struct.pack("<Q", 40) + b"general.arch"),
        _gguf("GGUF a text file", lambda ws: b"this is not a model\n" * 10),
        _gguf("GGUF with no tensors", lambda ws: _gguf_header(0, 0), ("general.architecture",)),
        BadInput("checkpoint", "model.path missing",
                 lambda ws: base_overrides(ws, f"model.path={ws.folder / 'none'}"), mentions=("none",)),
        BadInput("checkpoint", "model.path an empty folder",
                 lambda ws: base_overrides(ws, f"model.path={ws.folder}"), mentions=("config.json",)),
        BadInput("checkpoint", "Hub model offline and not cached",
                 lambda ws: base_overrides(ws, "model.path=nobody/no-such-model"), mentions=("nobody/no-such-model",)),
        BadInput("checkpoint", "unknown pretrained name",
                 lambda ws: base_overrides(ws, "model.path=smollm9-1b"), mentions=("smollm9-1b",)),
        BadInput("checkpoint", "preset that does not match the checkpoint",
                 lambda ws: base_overrides(ws, "model.preset=smollm2-135m"), mentions=("preset",)),
    ]


# ------------------------------------------------------------------------------------- resumed runs

def _resume(name: str, *changes: str, mentions: tuple[str, ...] = ()) -> BadInput:
    def build(ws: Workspace) -> list[str]:
        copy = ws.folder / "run"
        shutil.copytree(ws.finished_run, copy)
        return ["base", *ws.finished_overrides, f"logging.output_dir={copy}", "train.steps=4", *changes]
    return BadInput("resume", name, build, mentions=mentions, run_folder=True)


def resume_cases() -> list[BadInput]:
    return [
        _resume("another method", "method.name=boft", mentions=("boft",)),
        _resume("another LoRA rank", "method.lora.rank=2", mentions=("rank",)),
        _resume("another LoRA alpha", "method.lora.alpha=3", mentions=("alpha",)),
        _resume("other targets", "method.lora.targets=[q_proj]", mentions=("targets",)),
        _resume("another model", "model.preset=smollm2-135m", mentions=("preset",)),
        _resume("without resume", "checkpoint.resume=false", mentions=("checkpoint",)),
        _resume("a step not in the folder", "train.steps=1", mentions=("steps",)),
    ]


# ---------------------------------------------------------------------------------------- topologies

def _topology(name: str, topology: str, *extra: str, mentions: tuple[str, ...] = ()) -> BadInput:
    return BadInput("topology", name, lambda ws: ["base", "model.path=null", "model.preset=llama3.1-8b", *extra,
                                                  f"--topology={topology}"],
                    command="plan", mentions=mentions or (topology,))


def topology_cases() -> list[BadInput]:
    names = ["v5p", "v5p:", "v5p:8x8x", "v9z:2x2x2", "tpu:2x2", "v5p:0x2x2", "v5p:-2x2x2", "v5p:2x2x1x1",
             "v5p:3x5x7", "v5p:8 x8x8", "", "v5p:axbxc", "V5P:2x2x1", "v5p:1024x1024x1024"]
    cases = [_topology(f"topology {name!r}", name) for name in names]
    cases += [
        _topology("fsdp that does not divide the chips", "v5p:2x2x1", "mesh.fsdp=3", mentions=("fsdp",)),
        _topology("tensor larger than the chips", "v5p:2x2x1", "mesh.tensor=8", mentions=("tensor",)),
        _topology("mesh of more chips than the topology", "v5p:2x2x1", "mesh.data=2", "mesh.fsdp=4",
                  mentions=("mesh",)),
        _topology("batch that does not divide over the mesh", "v5p:2x2x2", "train.global_batch_size=4",
                  "mesh.fsdp=8", mentions=("global_batch_size",)),
    ]
    return cases


def all_cases() -> list[BadInput]:
    return config_cases() + data_cases() + checkpoint_cases() + resume_cases() + topology_cases()
