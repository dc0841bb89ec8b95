"""PEFT Studio's engine: config, data, model, train, evaluate, jobs, adapters."""
from finetune.config import JobConfig, ConfigError

__all__ = ["JobConfig", "ConfigError"]
__version__ = "0.1.0"
