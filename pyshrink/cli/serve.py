"""``pyshrink serve OUT``: an OpenAI-compatible completions endpoint over an exported ONNX folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        folder: Path = typer.Argument(..., help="Folder written by `pyshrink export` (a decoder)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8000, "--port", help="Port (0 = any free port)."),
        max_tokens: int = typer.Option(512, "--max-tokens", help="Largest max_tokens a request may ask for."),
        max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens",
                                                        help="Longest prompt accepted (default: the model's length - 1)."),
        max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted."),
        max_concurrency: int = typer.Option(4, "--max-concurrency", help="Requests generating at once (others wait)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
        verbose: bool = typer.Option(False, "--verbose", help="Log every request."),
    ):
        """Serve POST /v1/completions and GET /health until interrupted."""
        from ..errors import check_range
        from ..runtime import Limits, make_server

        check_range("--port", port, 0, 65535, integer=True)
        check_range("--max-tokens", max_tokens, 1, 1 << 20, integer=True)
        check_range("--max-concurrency", max_concurrency, 1, 1024, integer=True)
        check_range("--max-body-bytes", max_body_bytes, 1, 1 << 40, integer=True)
        if max_prompt_tokens is not None:
            check_range("--max-prompt-tokens", max_prompt_tokens, 1, 1 << 30, integer=True)
        if threads is not None:
            check_range("--threads", threads, 1, 1024, integer=True)
        limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                        max_concurrency=max_concurrency)
        server = make_server(folder, host, port, limits=limits, threads=threads, verbose=verbose)
        h, p = server.server_address[:2]
        typer.echo(f"serving {folder} on http://{h}:{p} (POST /v1/completions, GET /health); Ctrl-C stops")
        try:
            server.serve_forever()
        finally:
            server.server_close()
