"""Run configuration of `python -m hyjax.train`: YAML files in configs/ + `key=value` overrides, validated
into frozen typed sections before anything is loaded or compiled.

    config = load_config("quickstart", ["train.learning_rate=3e-4", "method.lora.rank=16"])
    method = hyjax.methods.method_of(config) # the chosen method: its adapter spec, optimizer part, ...
    config.save(f"{config.logging.output_dir}/config.yaml")   # load_config(that file) == config
"""

from hyjax.config.loading import (
    ENV_CONFIGS,
    apply_override,
    configs_dir,
    find_config,
    load_config,
    parse_value,
    saved_tree,
)
from hyjax.config.methods import METHODS, MethodSection
from hyjax.config.run import RunConfig
from hyjax.config.sections import (
    CheckpointSection,
    EvalSection,
    ExportSection,
    LoggingSection,
    MeshSection,
    ModelSection,
    TrainSection,
)
from hyjax.config.typed import ConfigError

__all__ = [
    "ENV_CONFIGS", "METHODS", "CheckpointSection", "ConfigError", "EvalSection", "ExportSection",
    "LoggingSection", "MeshSection", "MethodSection", "ModelSection", "RunConfig", "TrainSection",
    "apply_override", "configs_dir", "find_config", "load_config", "parse_value", "saved_tree",
]
