"""`RunConfig`: everything one `python -m hyjax.train` run needs, validated, and written back as YAML."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import yaml

from hyjax import adapters
from hyjax.config.methods import MethodSection
from hyjax.config.sections import (
    CheckpointSection,
    EvalSection,
    ExportSection,
    GRPOSection,
    LoggingSection,
    MeshSection,
    ModelSection,
    TrainSection,
)
from hyjax.config.typed import ConfigError, to_plain
from hyjax.data import DataConfig
from hyjax.methods import METHODS, method_of
from hyjax.model.params import abstract_params


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: one frozen, typed section per concern (see configs/base.yaml for every field)."""

    model: ModelSection = ModelSection()
    method: MethodSection = MethodSection()
    data: DataConfig = DataConfig()
    train: TrainSection = TrainSection()
    grpo: GRPOSection = GRPOSection()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    logging: LoggingSection = LoggingSection()
    export: ExportSection = ExportSection()

    def __post_init__(self):
        # Checks that span sections; each message names the keys involved.
        method = method_of(self.method)
        if self.export.peft_adapter and not method.peft_exportable(self.method):
            able = [name for name, other in METHODS.items() if other.peft_exportable(self.method)]
            raise ConfigError(
                f"export.peft_adapter=true, but method.name={self.method.name!r} cannot be written in PEFT's "
                f"format (with these settings: {', '.join(able)}); set export.peft_adapter=false "
                "(export.merged_model=true writes the merged model)")
        if self.export.gguf_lora and not method.gguf_lora_exportable(self.method):
            able = [name for name, other in METHODS.items() if other.gguf_lora_exportable(self.method)]
            raise ConfigError(
                f"export.gguf_lora=true, but method.name={self.method.name!r} cannot be written as a GGUF LoRA file "
                f"({', '.join(able)} can); set export.gguf_lora=false (export.gguf=f16 writes the merged model as "
                "GGUF)")
        if self.train.objective == "grpo":
            self._check_grpo(method)
        if method.from_gradients(self.method) and self.model.path is None:
            raise ConfigError(f"method.name={self.method.name!r} initialises from gradients of the pretrained "
                              "model, but model.path is null (random weights); give a checkpoint")

    def _check_grpo(self, method) -> None:
        if self.train.global_batch_size % self.grpo.group_size:
            raise ConfigError(f"train.global_batch_size={self.train.global_batch_size} counts the completions of a "
                              f"GRPO step, so grpo.group_size={self.grpo.group_size} must divide it")
        if self.data.task not in ("math", "gsm8k"):
            raise ConfigError(f"train.objective=grpo rewards answers to questions: data.task must be math (a "
                              f"question and an answer column), not {self.data.task!r}")

    @property
    def checkpoint_dir(self) -> str:
        """`checkpoint.dir`, or `<logging.output_dir>/checkpoints` when it is null."""
        return self.checkpoint.dir or os.path.join(self.logging.output_dir, "checkpoints")

    def check_model(self, model_config=None) -> dict:
        """Applies the adapter spec to the model's abstract parameters (shapes only, nothing allocated)
        so targets that match nothing or shapes a method cannot take (a BOFT block that does not divide
        d_in) fail before any download or compile. Returns the abstract adapted tree
        (`hyjax.adapters.count_trainable` of it gives the trainable parameter counts).

        model_config: the `LlamaConfig` (default: the preset's). Initialises JAX: call it after
        `jax.distributed.initialize`.
        """
        model_config = model_config or self.model.preset_config()
        if model_config is None:
            raise ConfigError("model.preset is null: pass the checkpoint's LlamaConfig to check_model")
        spec = method_of(self.method).adapter_spec(self, model_config)
        params = abstract_params(model_config)
        try:  # the gradients LoRA-GA and the hybrid start from have the weights' shapes
            return jax.eval_shape(lambda p: adapters.apply(spec, p, jax.random.key(0), gradients=p), params)
        except ValueError as err:
            raise ConfigError(f"method.name={self.method.name!r} does not fit model.preset="
                              f"{self.model.preset!r}: {err}") from err

    def to_dict(self) -> dict:
        """Plain nested dicts and lists: the resolved config, loadable again with `load_config`."""
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=110)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Writes the resolved config as YAML (a run records exactly what it ran with)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Resolved hyjax run configuration (load_config(this file) gives the same RunConfig).\n"
                        + self.to_yaml())
        return path
