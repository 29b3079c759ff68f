"""``rocket-deploy serve``: an OpenAI-compatible HTTP server over an artifact, ONNX file or TensorRT engine."""
from __future__ import annotations

import os

import click

from ._options import no_verify_option, trust_remote_code_option


@click.command("serve")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default is loopback only; use 0.0.0.0 to listen on all interfaces.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--model-name", default=None, help="Model id reported by /v1/models and in responses "
                                                 "[default: the PATH's base name].")
@click.option("--max-prompt-tokens", type=int, default=2048, show_default=True, help="Longest prompt, in tokens.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True,
              help="Largest max_tokens a request may ask for (also the default).")
@click.option("--max-concurrent", type=int, default=4, show_default=True,
              help="Requests generating at once (interleaved token by token on one engine thread).")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests waiting for a slot; more are answered 429 with Retry-After.")
@click.option("--request-timeout", type=float, default=300.0, show_default=True,
              help="Seconds a request may take in all (queue wait -> 503, generation -> 504).")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True,
              help="Larger request bodies are answered 413.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="On SIGINT/SIGTERM, seconds in-flight requests may take to finish (then: 503).")
@click.option("--header-timeout", type=float, default=10.0, show_default=True,
              help="Seconds a client may take to send a request's headers (then: 408, connection closed).")
@click.option("--body-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a client may take to send a request's body (then: 408).")
@click.option("--api-key", envvar="ROCKET_API_KEY", show_envvar=True, default=None,
              help="Require 'Authorization: Bearer <key>' on every endpoint but /health (401 otherwise). "
                   "Prefer the environment variable: a flag shows in the process list.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Artifacts and .plan files on CUDA: decode steps replayed from CUDA graphs on a static KV cache "
                   "[default: on where the model runs on CUDA].")
@no_verify_option
@trust_remote_code_option
def serve(path, host, port, model_name, max_prompt_tokens, max_new_tokens, max_concurrent, max_queue,
          request_timeout, max_body_bytes, shutdown_timeout, header_timeout, body_timeout, api_key, log_level,
          cuda_graphs, no_verify, trust_remote_code):
    """OpenAI-compatible HTTP server over a model.

    PATH is an artifact directory (from `rocket-deploy compress`), a .onnx file (from `rocket-deploy export`)
    or a TensorRT .plan/.engine file (from `rocket-deploy build`).

    Endpoints: POST /v1/completions, POST /v1/chat/completions (stream=true for SSE), GET /v1/models,
    GET /health, GET /metrics. Stop with Ctrl-C or SIGTERM (in-flight requests finish first). Binding an
    address other than loopback without --api-key prints a warning."""
    if not os.path.exists(path):
        raise click.BadParameter(
            f"{path!r} does not exist. Pass an artifact directory (create one with `rocket-deploy compress`), "
            f"a .onnx file (`rocket-deploy export`) or a .plan file (`rocket-deploy build`).", param_hint="PATH")
    try:
        from rocket_deploy.runtime.server import ServerSettings, serve as run_server
    except ImportError as e:
        raise click.ClickException(f"serving needs FastAPI and uvicorn ({e}); install them with "
                                   f"`pip install 'rocket-deploy[serve]'`")
    name = model_name or os.path.basename(os.path.normpath(path)) or "rocket-model"
    try:
        settings = ServerSettings(model_name=name, max_prompt_tokens=max_prompt_tokens,
                                  max_new_tokens=max_new_tokens, max_concurrent=max_concurrent,
                                  max_queue=max_queue, request_timeout_s=request_timeout,
                                  max_body_bytes=max_body_bytes, shutdown_timeout_s=shutdown_timeout,
                                  header_timeout_s=header_timeout, body_timeout_s=body_timeout, api_key=api_key)
    except ValueError as e:
        opt = str(e).split(" ", 1)[0]
        flag = {"request_timeout_s": "--request-timeout", "shutdown_timeout_s": "--shutdown-timeout",
                "header_timeout_s": "--header-timeout", "body_timeout_s": "--body-timeout"}.get(
            opt, "--" + opt.replace("_", "-"))
        raise click.BadParameter(str(e), param_hint=f"'{flag}'")

    from rocket_deploy.runtime.engine import open_engine
    try:
        engine = open_engine(path, verify=not no_verify, trust_remote_code=trust_remote_code,   # artifacts only
                             cuda_graphs=cuda_graphs)                                       # torch / trt
    except FileNotFoundError as e:
        raise click.BadParameter(f"{e}. Pass an artifact directory, a .onnx file or a .plan file.",
                                 param_hint="PATH")
    except ImportError as e:
        raise click.ClickException(f"cannot open {path!r}: a backend package is missing ({e}). "
                                   f"`rocket-deploy doctor` lists which backends work here.")
    except Exception as e:  # noqa: BLE001 -- turn loader errors into a one-line CLI error
        raise click.ClickException(f"cannot open {path!r}: {type(e).__name__}: {e}")
    try:
        kind = "decoder" if engine.is_decoder else "encoder (generation endpoints answer 400)"
        click.echo(f"serving {name!r} ({engine.backend} backend, {kind}) on http://{host}:{port}/v1", err=True)
        run_server(engine, host=host, port=port, settings=settings, log_level=log_level)
    finally:
        engine.close()
