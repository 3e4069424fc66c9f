"""The `nebula` command. Each command imports its heavy dependencies only when it runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from services.cli_data import data_app

app = typer.Typer(help="Nebula RL: post-training jobs (SFT, GRPO, OPD, MOPD) as a service.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
verifier_app = typer.Typer(help="The verifier service.", no_args_is_help=True)
app.add_typer(verifier_app, name="verifier")
teacher_app = typer.Typer(help="The teacher-logprob service (OPD/MOPD).", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
model_app = typer.Typer(help="Model checkpoints (GGUF import).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@verifier_app.command("serve")
def verifier_serve(
    port: Annotated[Optional[int], typer.Option(help="gRPC port (0 picks a free one)")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address")] = None,
    config: Annotated[Optional[Path], typer.Option(help="VerifierServiceConfig YAML/JSON")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus port")] = None,
    workers: Annotated[Optional[int], typer.Option(help="pool processes")] = None,
) -> None:
    """Run the verifier gRPC service until interrupted."""
    from verifier.__main__ import main as verifier_main

    argv: list[str] = []
    for flag, value in (("--port", port), ("--host", host), ("--config", config),
                        ("--metrics-port", metrics_port), ("--workers", workers)):
        if value is not None:
            argv += [flag, str(value)]
    raise typer.Exit(verifier_main(argv))


@verifier_app.command("list")
def verifier_list(address: Annotated[str, typer.Option(help="HOST:PORT")] = "127.0.0.1:50051") -> None:
    """List the verifiers a service runs."""
    from nebula.clients.verifier import VerifierClient

    with VerifierClient(address, retry_s=5) as client:
        for v in client.list_verifiers():
            typer.echo(json.dumps(v))


@teacher_app.command("serve")
def teacher_serve(
    config: Annotated[Path, typer.Option(help="TeacherServiceConfig YAML/JSON (the hosted teachers)")],
    port: Annotated[Optional[int], typer.Option(help="gRPC port (0 picks a free one)")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus port")] = None,
) -> None:
    """Run the teacher-logprob gRPC service until interrupted."""
    from teacher.__main__ import main as teacher_main

    argv = ["--config", str(config)]
    for flag, value in (("--port", port), ("--host", host), ("--metrics-port", metrics_port)):
        if value is not None:
            argv += [flag, str(value)]
    raise typer.Exit(teacher_main(argv))


@model_app.command("import")
def model_import(
    src: Annotated[Path, typer.Argument(help="GGUF file (llama.cpp format)")],
    out: Annotated[Path, typer.Argument(help="Hugging Face checkpoint dir to write")],
    dtype: Annotated[str, typer.Option(help="weight dtype: float32 | bfloat16 | float16")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty OUT")] = False,
) -> None:
    """Import a GGUF file as a Hugging Face checkpoint dir (for transformers and vLLM)."""
    import time

    from nebula.model_import import ModelImportError, checkpoint_summary, import_gguf

    t0 = time.monotonic()
    try:
        path = import_gguf(src, out, dtype, overwrite=overwrite)
    except (ModelImportError, OSError, ValueError) as e:
        _fail(str(e))
    s = checkpoint_summary(path)
    typer.echo(f"imported {src} -> {path}\n  architecture {s['architecture']}, "
               f"{s['parameters']:,} parameters, vocab {s['vocab_size']:,}, {s['dtype']}, "
               f"{time.monotonic() - t0:.1f} s")


@app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="JSONL: one {verifier, response, reference, metadata} per line ('-' for stdin)")],
    address: Annotated[Optional[str], typer.Option(help="verifier service HOST:PORT")] = None,
    local: Annotated[bool, typer.Option("--local", help="verify in-process, no server")] = False,
    timeout: Annotated[float, typer.Option(help="per-item deadline, seconds (0: default)")] = 0.0,
    config: Annotated[Optional[Path], typer.Option(help="VerifierServiceConfig for --local")] = None,
) -> None:
    """Score a JSONL file of items; prints one JSON result per line, in order."""
    if (address is None) == (not local):
        _fail("give exactly one of --address HOST:PORT or --local")
    if str(file) != "-" and not file.is_file():
        _fail(f"file not found: {file}")
    lines = sys.stdin if str(file) == "-" else file.open()
    from verifier.jsonl import verify_lines

    if local:
        _verify_local(lines, timeout, config)
        return
    import grpc

    from nebula.clients.verifier import VerifierClient

    with VerifierClient(address, retry_s=5) as client:  # type: ignore[arg-type]
        try:
            known = {v["name"] for v in client.list_verifiers()}
            for res in verify_lines(lines, known, lambda items: client.verify(items, timeout)):
                typer.echo(json.dumps(res.to_json()))
        except grpc.RpcError as e:
            _fail(f"verifier service at {address}: {e.code().name}: {e.details()}")


def _verify_local(lines: object, timeout: float, config_path: Optional[Path]) -> None:
    import asyncio

    from nebula.config import ConfigError, VerifierServiceConfig, load_file
    from verifier.engine import VerifierEngine
    from verifier.jsonl import verify_lines

    try:
        cfg = load_file(VerifierServiceConfig, config_path) if config_path else VerifierServiceConfig()
    except ConfigError as e:
        _fail(str(e))

    async def run() -> None:
        engine = VerifierEngine(cfg)
        await engine.start()
        loop = asyncio.get_running_loop()
        try:
            known = set(engine.registry.names())
            # verify_lines is synchronous; run it in a thread that submits to this loop.
            def chunk(items: list) -> list:
                return asyncio.run_coroutine_threadsafe(
                    engine.verify_batch(items, timeout), loop).result()

            def drain() -> None:
                for res in verify_lines(lines, known, chunk):  # type: ignore[arg-type]
                    typer.echo(json.dumps(res.to_json()))

            await loop.run_in_executor(None, drain)
        finally:
            await engine.close()

    asyncio.run(run())


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="job config (YAML or JSON)")],
    job_id: Annotated[Optional[str], typer.Option(help="job id (default: name + random)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream the actors' output "
                                          "(vLLM, Ray, DeepSpeed) here instead of to "
                                          "OUTPUT_DIR/logs/*.log")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the job's summary as one "
                                           "JSON line at the end")] = False,
) -> None:
    """Run a job on the embedded default (local Ray, Redis, verifier) or a configured cluster."""
    from nebula.config import ConfigError, load_file
    from nebula.config.job import JobConfig
    from nebula.logfiles import VERBOSE_ENV

    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        quiet_libraries()

    try:
        cfg = load_file(JobConfig, config)
    except ConfigError as e:
        _fail(str(e))
    from services.progress import run_with_progress

    try:
        summary = run_with_progress(cfg, job_id)
    except (SystemExit, KeyboardInterrupt) as e:  # SIGTERM (Ray's handler) or Ctrl-C
        # The runner has checkpointed the current step and stopped its workers and services;
        # exit as a terminated process does, without Ray's atexit hooks aborting on the way.
        typer.echo(f"job stopped ({type(e).__name__}); `resume_from` its newest checkpoint "
                   f"under {cfg.checkpoint.dir if cfg.checkpoint else cfg.output_dir} to go on",
                   err=True)
        sys.stderr.flush()
        os._exit(143 if isinstance(e, SystemExit) else 130)
    if json_out:
        typer.echo(json.dumps({"job_id": summary["job_id"], "evals": summary["evals"],
                               "export": summary.get("export"),
                               "wall_s": round(summary["wall_s"], 1)}))


def quiet_libraries() -> None:
    """The driver's own library chatter off the console: transformers' and the Hub's
    progress bars (e.g. writing the toy model) and info logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


@app.command("eval")
def eval_(
    config: Annotated[Path, typer.Argument(help="eval config (YAML or JSON, `kind: eval`)")],
    job_id: Annotated[Optional[str], typer.Option(help="job id (default: name + random)")] = None,
) -> None:
    """Evaluate a model on eval sets: pass@k, mean@n, greedy accuracy, lengths, truncation
    (results under its output_dir: eval_results.json, eval_results.md, TensorBoard)."""
    from nebula.config import ConfigError, load_file
    from nebula.evaluation import EvalJobConfig

    try:
        cfg = load_file(EvalJobConfig, config)
    except ConfigError as e:
        _fail(str(e))
    from nebula.prompts import DatasetError
    from services.evaluate import EvalInputError, EvalRunner

    try:
        summary = EvalRunner(cfg, job_id, log=lambda s: typer.echo(s, err=True)).run()
    except (EvalInputError, DatasetError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"job_id": summary["job_id"], "results": summary["results"],
                           "metrics": summary["metrics"]["all"],
                           "wall_s": round(summary["wall_s"], 1)}))


# -- the REST job service and its client -------------------------------------------------

Server = Annotated[Optional[str], typer.Option("--server", envvar="NEBULA_SERVER",
                                               help="API URL (default http://127.0.0.1:8000)")]
Token = Annotated[Optional[str], typer.Option("--token", envvar="NEBULA_TOKEN",
                                              help="bearer token")]


def _client(server: Optional[str], token: Optional[str]):  # noqa: ANN202 - lazy import
    from services.sdk import NebulaClient

    return NebulaClient(server, token)


def _api_call(fn, *args, **kw):  # noqa: ANN001, ANN202
    """Run an SDK call; API and connection errors end the command with a message."""
    import httpx

    from services.sdk import ApiError

    try:
        return fn(*args, **kw)
    except ApiError as e:
        _fail(str(e), 1)
    except httpx.HTTPError as e:
        _fail(f"cannot reach the API: {e}", 1)


@app.command()
def serve(
    config: Annotated[Optional[Path], typer.Option(help="ApiConfig YAML/JSON")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port")] = None,
    work_dir: Annotated[Optional[str], typer.Option(help="job outputs, embedded Redis/Ray state")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="Redis (default: embedded)")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray job-submission address (default: RAY_ADDRESS, else an embedded Ray)")] = None,
) -> None:
    """Run the REST job service (and its dashboard at /)."""
    import logging

    import uvicorn

    from nebula.config import ConfigError
    from services.api.settings import load_api_config

    try:
        cfg = load_api_config(config, host=host, port=port, work_dir=work_dir,
                              redis_url=redis_url, ray_address=ray_address)
    except ConfigError as e:
        _fail(str(e))
    from services.api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info",
                access_log=cfg.access_log, timeout_graceful_shutdown=5)


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="job config (YAML or JSON)")],
    priority: Annotated[int, typer.Option(help="higher starts first")] = 0,
    idempotency_key: Annotated[Optional[str], typer.Option(help="retry-safe key")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="show progress until the job ends")] = False,
    server: Server = None, token: Token = None,
) -> None:
    """Submit a job to the API; prints its id."""
    if not config.is_file():
        _fail(f"config file not found: {config}")
    with _client(server, token) as c:
        job = _api_call(c.submit, config, priority, idempotency_key)
        typer.echo(job["id"])
        if follow:
            from services.cli_view import follow_progress

            raise typer.Exit(_api_call(follow_progress, c, job["id"]))


@app.command()
def jobs(
    state: Annotated[Optional[str], typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    server: Server = None, token: Token = None,
) -> None:
    """List jobs, newest first."""
    with _client(server, token) as c:
        res = _api_call(c.list, state, limit)
    if as_json:
        for j in res["jobs"]:
            typer.echo(json.dumps({k: v for k, v in j.items() if k != "config"}))
        return
    from services.cli_view import jobs_table

    jobs_table(res["jobs"])


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="job id")],
    as_json: Annotated[bool, typer.Option("--json", help="the JobView as JSON")] = False,
    server: Server = None, token: Token = None,
) -> None:
    """Show one job: state, stage, step, latest metrics, checkpoints, evals."""
    with _client(server, token) as c:
        job = _api_call(c.get, job_id)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    from services.cli_view import job_panel

    job_panel(job)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="job id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
    server: Server = None, token: Token = None,
) -> None:
    """Print a job's log lines."""
    with _client(server, token) as c:
        if follow:
            for line in _follow(c, job_id):
                typer.echo(line)
            return
        since = None
        while True:
            page = _api_call(c.logs, job_id, since, 5000)
            for line in page["lines"]:
                typer.echo(line)
            if not page["lines"]:
                return
            since = page["next_since"]


def _follow(c, job_id: str):  # noqa: ANN001, ANN202
    import httpx

    from services.sdk import ApiError

    try:
        yield from c.follow_logs(job_id)
    except ApiError as e:
        _fail(str(e), 1)
    except httpx.HTTPError as e:
        _fail(f"cannot reach the API: {e}", 1)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="job id")],
           server: Server = None, token: Token = None) -> None:
    """Cancel a queued or running job."""
    with _client(server, token) as c:
        job = _api_call(c.cancel, job_id)
    typer.echo(f"{job['id']}: {job['state']}")


@app.command()
def resume(job_id: Annotated[str, typer.Argument(help="job id")],
           checkpoint: Annotated[Optional[str], typer.Option(help="checkpoint path or tag (default: latest)")] = None,
           server: Server = None, token: Token = None) -> None:
    """Requeue a failed or cancelled job from a checkpoint."""
    with _client(server, token) as c:
        job = _api_call(c.resume, job_id, checkpoint)
    typer.echo(f"{job['id']}: {job['state']} (resume_from {job['config'].get('resume_from')})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
