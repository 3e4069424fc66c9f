"""`python -m teacher --config FILE`: run the teacher-logprob gRPC service.

Reads config first (flags over a YAML/JSON file); torch, transformers and the server come after,
so a bad config fails in milliseconds with the field named. A teacher that cannot be loaded
(missing checkpoint, no GPU for device cuda) also exits with status 2 and names its field.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def build_config(config_path: str, overrides: dict[str, Any]) -> Any:
    from nebula.config.load import load_file, load_model
    from nebula.config.teacher import TeacherServiceConfig

    data = load_file(TeacherServiceConfig, config_path).model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    return load_model(TeacherServiceConfig, data, source=config_path)


def run(config: Any) -> int:
    """Serve `config` (a TeacherServiceConfig) until SIGINT/SIGTERM; for the CLI as well."""
    import asyncio
    import logging

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from teacher.model import TeacherLoadError
    from teacher.server import serve

    try:
        asyncio.run(serve(config))
    except TeacherLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m teacher", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML/JSON file with a TeacherServiceConfig")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--metrics-port", type=int)
    args = ap.parse_args(argv)
    from nebula.config.load import ConfigError

    try:
        config = build_config(args.config, {"host": args.host, "port": args.port,
                                            "metrics_port": args.metrics_port})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
