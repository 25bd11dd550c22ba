"""One typed config tree for a PPO run.

Every setting lives in one of the frozen dataclasses of :mod:`.schema`; the string literal
under each field is its documentation (it becomes the ``--help`` text of the generated CLI).
A run's config comes from a YAML file plus dotted overrides (``--ppo.clip_ratio 0.2``,
:mod:`.loading`), is validated as a whole before anything starts (:mod:`.validate`), and is
never mutated afterwards. A choice is a ``Literal`` annotation (:mod:`.choices`), read by the loader,
validation and ``--help``. Batch sizes that depend on each other are derived once by
:func:`resolve` (:mod:`.sizes`); :mod:`.docs` turns the field docstrings into help text.
Whatever is saved or printed of a config goes through :func:`redacted` (URL secrets masked).

Import everything from here (``from rlhf_ray.config import Config, load_config``); the
submodules are the layout, not the interface. The package imports only the standard
library (and yaml lazily, to read files and CLI values).
"""

from rlhf_ray.config.choices import Dtype, Template, TinyModel, TooLong, choice_errors, choices_of
from rlhf_ray.config.docs import field_docs, fields_help, iter_fields
from rlhf_ray.config.loading import (
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    redact_url,
    redacted,
)
from rlhf_ray.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    FrozenDict,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    PPOConfig,
    ReferenceConfig,
    ResourcesConfig,
    RewardConfig,
    RoleResources,
    RolloutConfig,
    SyncConfig,
    VLLMConfig,
    get_path,
)
from rlhf_ray.config.sizes import Sizes, _divide, resolve
from rlhf_ray.config.validate import (field_errors, interface_errors, optimizer_errors, raise_if_any, resource_errors,
                                      validate)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "FrozenDict", "LearnerConfig",
    "LoggingConfig", "ModelConfig", "PPOConfig", "ReferenceConfig", "ResourcesConfig", "RewardConfig",
    "RoleResources", "RolloutConfig", "Sizes", "SyncConfig", "VLLMConfig", "choice_errors", "choices_of", "config_from_dict",
    "config_to_dict", "field_docs", "fields_help", "Dtype", "Template", "TinyModel", "TooLong",
    "get_path", "iter_fields", "load_config", "parse_overrides", "resolve", "validate", "field_errors", "interface_errors", "optimizer_errors",
    "raise_if_any", "resource_errors", "redact_url", "redacted",
]
# _divide (not in __all__) stays importable from here as it was from the single-module config.
