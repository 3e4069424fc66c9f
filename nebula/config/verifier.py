"""Config of the verifier service (`nebula verifier serve`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base for every config model: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


class SandboxConfig(Strict):
    """Isolation for untrusted code run by the `code` verifier."""

    allow_unsandboxed: bool = Field(
        False,
        description="Run code with rlimits only when bubblewrap cannot be set up. Unsafe: "
        "only for trusted code on a throwaway machine.",
    )
    bwrap: str = Field("bwrap", description="bubblewrap executable.")
    python: str = Field(
        "/usr/bin/python3",
        description="Interpreter for sandboxed code; must be readable by the unprivileged uid.",
    )
    wall_timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit of one sandboxed run.")
    per_test_timeout_s: float = Field(4.0, gt=0, description="Limit for each test inside a run.")
    cpu_s: int = Field(10, gt=0, description="RLIMIT_CPU of the sandboxed process, seconds.")
    memory_mb: int = Field(1024, gt=0, description="RLIMIT_AS of the sandboxed process, MiB.")
    max_processes: int = Field(32, gt=0, description="RLIMIT_NPROC for the sandbox uid.")
    file_size_mb: int = Field(16, gt=0, description="RLIMIT_FSIZE: largest file it may write, MiB.")
    max_output_bytes: int = Field(1 << 20, gt=0, description="Stdout/stderr kept per run.")
    uid_base: int = Field(
        61000,
        description="Sandboxes run as uid/gid uid_base+slot (distinct per concurrent run, since "
        "RLIMIT_NPROC counts per uid). Only used when the service runs as root.",
    )
    slots: int = Field(4, gt=0, description="Concurrent sandboxed runs.")


class RemoteVerifierConfig(Strict):
    """A verifier served by another gRPC server implementing nebula.v1.VerifierService."""

    address: str = Field(..., description="host:port of the remote verifier service.")
    remote_name: str | None = Field(
        None, description="Verifier name on the remote side (default: the local name)."
    )
    timeout_s: float = Field(30.0, gt=0, description="Deadline of each remote call.")


class VerifierServiceConfig(Strict):
    """The sandboxed verifier gRPC service."""

    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics HTTP port; none disables it."
    )
    workers: int = Field(2, gt=0, description="Processes in the pool for CPU-bound verifiers.")
    item_timeout_s: float = Field(
        10.0, gt=0, description="Default deadline of each item, queueing included."
    )
    max_batch_items: int = Field(4096, gt=0, description="Most items in one VerifyBatch call.")
    max_message_mb: int = Field(64, gt=0, description="Largest gRPC message accepted, MiB.")
    max_response_chars: int = Field(
        200_000, gt=0, description="Longest response text verified; longer items get an error."
    )
    load_plugins: bool = Field(
        True, description="Load third-party verifiers from the `nebula.verifiers` entry points."
    )
    remotes: dict[str, RemoteVerifierConfig] = Field(
        default_factory=dict, description="Verifiers served elsewhere, by local name."
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
