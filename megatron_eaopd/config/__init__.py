"""Configuration: the typed schema and the YAML loader (``defaults:`` inheritance, overrides).

Typical use::

    from megatron_eaopd.config import load_config, save_resolved
    cfg = load_config("configs/tiny-cpu.yaml", ["loss.objective=opd", "training.seed=1"])
    save_resolved(cfg, f"{cfg.training.output_dir}/config.yaml")
"""

from megatron_eaopd.config.bridge import model_kwargs, objective_kwargs
from megatron_eaopd.config.checks import check_run
from megatron_eaopd.config.loader import (
    ConfigError,
    apply_overrides,
    build_arg_parser,
    config_from_dict,
    config_to_dict,
    describe_fields,
    field_docs,
    load_config,
    load_yaml_with_defaults,
    parse_override,
    save_resolved,
)
from megatron_eaopd.config.schema import (
    OBJECTIVES,
    EAOPDConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    ModelsConfig,
    OptimizerConfig,
    ParallelConfig,
    ParallelLayout,
    RolloutConfig,
    StudentPrepConfig,
    SyntheticTaskConfig,
    TaskConfig,
    TeacherPrepConfig,
    TokenizerConfig,
    TrainingConfig,
)

__all__ = [
    "OBJECTIVES",
    "ConfigError",
    "EAOPDConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "ModelsConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ParallelLayout",
    "RolloutConfig",
    "StudentPrepConfig",
    "SyntheticTaskConfig",
    "TaskConfig",
    "TeacherPrepConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "apply_overrides",
    "build_arg_parser",
    "check_run",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "field_docs",
    "load_config",
    "load_yaml_with_defaults",
    "model_kwargs",
    "objective_kwargs",
    "parse_override",
    "save_resolved",
]
