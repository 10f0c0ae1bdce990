"""``ctrldiff serve-reward``: serve any reward over HTTP for ``--reward remote:http://HOST:PORT``."""

from __future__ import annotations

import signal
import threading

import click


@click.command("serve-reward")
@click.option("--reward", "spec", required=True, help="Reward spec to serve (built-in, model reward, module:function).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: any free port, printed).")
@click.option("--max-batch", type=int, default=256, show_default=True, help="Most samples per request.")
@click.option("--max-mb", type=float, default=64.0, show_default=True, help="Largest request body in MiB.")
@click.option("--device", default="cpu", show_default=True, help="Device the reward runs on.")
@click.option("--io-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a client may stall mid-request before it is dropped.")
@click.option("--max-connections", type=int, default=64, show_default=True,
              help="Connections served at once (a thread each); more get an immediate 503, which clients retry.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--verbose", is_flag=True, help="Log every request.")
def serve_reward_cmd(spec, host, port, max_batch, max_mb, device, io_timeout, max_connections, threads,
                     verbose) -> None:
    """Serve a reward: POST /score (JSON, see docs/REWARDS.md), GET /health. Stops on SIGTERM / Ctrl-C."""
    from .cli import _threads
    from .errors import CtrlDiffError
    from .rewards.server import RewardServer

    _threads(threads)
    if not 0 <= port <= 65535:
        raise CtrlDiffError(f"--port must lie in 0..65535, got {port}")
    if not io_timeout > 0:
        raise CtrlDiffError(f"--io-timeout must be > 0, got {io_timeout}")
    if verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = RewardServer(spec, host=host, port=port, max_batch=max_batch, max_bytes=int(max_mb * (1 << 20)),
                          device=device, io_timeout=io_timeout, verbose=verbose, max_connections=max_connections)

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(f"serving reward {server.reward.name!r} on {server.url} (max batch {max_batch})", nl=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    click.echo("stopped")
