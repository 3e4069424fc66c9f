"""One typed config tree shared by the CLI, the REST API and k8s ConfigMaps."""

from nebula.config.load import ConfigError, load_file, load_model, parse_text
from nebula.config.verifier import RemoteVerifierConfig, SandboxConfig, VerifierServiceConfig

__all__ = [
    "ConfigError",
    "RemoteVerifierConfig",
    "SandboxConfig",
    "VerifierServiceConfig",
    "load_file",
    "load_model",
    "parse_text",
]
