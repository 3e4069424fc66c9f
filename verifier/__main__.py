"""`python -m verifier`: run the verifier gRPC service.

Reads config first (flags over an optional YAML/JSON file); the server and its heavy
imports come after, so a bad config fails in milliseconds with the field named.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def build_config(config_path: str | None, overrides: dict[str, Any]) -> Any:
    from nebula.config import VerifierServiceConfig, load_file, load_model

    base = load_file(VerifierServiceConfig, config_path) if config_path else VerifierServiceConfig()
    data = base.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    return load_model(VerifierServiceConfig, data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verifier", description=__doc__)
    ap.add_argument("--config", help="YAML/JSON file with a VerifierServiceConfig")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--metrics-port", type=int)
    ap.add_argument("--workers", type=int)
    args = ap.parse_args(argv)
    from nebula.config import ConfigError

    try:
        config = build_config(args.config, {"host": args.host, "port": args.port,
                                            "metrics_port": args.metrics_port,
                                            "workers": args.workers})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import asyncio
    import logging
    import os

    # The code sandbox forks subprocesses from a threaded gRPC server; gRPC's fork handlers
    # are not needed there (children exec at once) and only log warnings.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from verifier.server import serve

    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
