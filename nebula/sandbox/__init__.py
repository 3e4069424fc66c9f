"""The code sandbox (bubblewrap + rlimits + an unprivileged uid), shared by the code verifier
and the python tool of the `tools` environment: `core.py` runs code, `limits.py` says which
limit a run hit, `procs.py` kills and reaps its processes."""

from nebula.sandbox.core import Sandbox
from nebula.sandbox.limits import SandboxResult, classify_exception

__all__ = ["Sandbox", "SandboxResult", "classify_exception"]
