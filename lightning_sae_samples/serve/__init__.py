"""``lightning-sae-samples serve DIR``: every latent of a samples directory in the browser, live while it trains.

Needs the ``serve`` extra (``pip install 'lightning-sae-samples[serve]'``: Starlette and uvicorn); this module
imports them only when a server starts, so :func:`serve_command` works without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning_sae_samples.arguments import OneLineErrorParser
from lightning_sae_samples.printed_commands import PROG, pip_command, program_command

COMMAND = "serve"
DEFAULT_HOST = "127.0.0.1"
LOCAL_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


def serve_command(dirpath: Any) -> str:
    """The one-line shell command that opens ``dirpath`` in the browser (``lightning-sae-samples serve DIR``).

    The command is named by its path in this environment, so a new shell runs it without activating anything.
    """
    return program_command(COMMAND, os.fspath(dirpath))


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-sae-samples serve``."""
    parser = OneLineErrorParser(
        prog=f"{PROG} {COMMAND}",
        description="Browse every latent of a samples directory (or of the SAEs of a run folder, or of the runs in a"
        " parent folder) in a local web page: a sortable, filterable list, feature pages, search by token and by"
        " context text (across SAEs too). The page follows new saves while the training runs. Never writes the"
        " samples files: labels typed on a feature page go to the explanations sidecar (DIR/explanations/).",
        epilog=f"example:\n  {PROG} {COMMAND} lightning_logs --open",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("samples_dir", metavar="DIR",
                        help="a samples directory, a run folder of many SAEs, or a folder holding several runs")
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"interface to listen on (default: {DEFAULT_HOST}, this machine only)"
    )
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    parser.add_argument(
        "--allow-writes", action="store_true", help="accept labels typed on the page also when --host is not"
        " 127.0.0.1 (labels go to DIR/explanations/ only; on 127.0.0.1 they are always accepted from the page)",
    )
    parser.add_argument(
        "--tokenizer", metavar="NAME", help="Hugging Face tokenizer for latents only full_state.pt holds"
        " (default: the one the run recorded, from local files)",
    )
    return parser


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one chosen by the system).

    Raises:
        OSError: The address is taken or cannot be used; the message names it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise OSError(
            f"Cannot listen on {host}:{port} ({err.strerror or err}). Pass another --port, or 0 for a free one."
        ) from err
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    """The page's address (``0.0.0.0`` shown as ``127.0.0.1``, the address that works from this machine)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


class Server:
    """A running server over a directory: its runs, the uvicorn server and the address it listens on.

    Args:
        samples_dir: A samples directory or a folder of runs.
        host: Interface to listen on.
        port: Port (0: a free one).
        tokenizer: For latents only ``full_state.pt`` holds.
        poll_seconds: How often the directories are checked for a new save.
        allow_writes: Accept labels from the page on a non-loopback ``host`` too (on the loopback interface they
            are always accepted from the page itself).
    """

    def __init__(
        self,
        samples_dir: Any,
        host: str = DEFAULT_HOST,
        port: int = 0,
        tokenizer: Any = None,
        poll_seconds: float = 1.0,
        allow_writes: bool = False,
    ) -> None:
        try:
            import uvicorn
        except ImportError as err:
            raise ImportError(
                f"`{PROG} {COMMAND}` needs Starlette and uvicorn: {pip_command('install', '-e', '.[serve]')} from the"
                f" checkout (once released: {pip_command('install', 'lightning-sae-samples[serve]')})."
            ) from err
        from lightning_sae_samples.serve.app import create_app
        from lightning_sae_samples.serve.runs import RunSet

        self.runs = RunSet(Path(samples_dir), tokenizer=tokenizer, poll_seconds=poll_seconds)
        self.runs.start()
        self.socket = bind_socket(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.url = url_of(host, self.port)
        self.writes_allowed = is_loopback(host) or allow_writes
        app = create_app(self.runs, allowed_hosts=None if not is_loopback(host) else LOCAL_NAMES,
                         allow_writes=self.writes_allowed)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)

    def run(self) -> None:
        """Serve until interrupted (or :meth:`stop`)."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.runs.stop()
            self.socket.close()

    def start_thread(self) -> threading.Thread:
        """Serve in a background thread (for tests and notebooks); returns it once the server is accepting."""
        thread = threading.Thread(target=self.run, name="sae-samples-serve", daemon=True)
        thread.start()
        while not self.server.started and thread.is_alive():
            threading.Event().wait(0.02)
        return thread

    def stop(self) -> None:
        """Ask the server to finish."""
        self.server.should_exit = True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lightning-sae-samples serve``: returns the exit status (2 on an error, with one line on stderr)."""
    from rich.console import Console

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    console = Console()
    try:
        server = Server(args.samples_dir, args.host, args.port, args.tokenizer, allow_writes=args.allow_writes)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line, never a traceback
        sys.stderr.write(f"{PROG} {COMMAND}: error: {' '.join(str(err).split()) or type(err).__name__}\n")
        return 2
    runs, saes = server.runs.names, server.runs.sae_names
    what = f"{len(saes)} SAEs of the run" if saes else f"{len(runs)} run{'s' if len(runs) != 1 else ''} of"
    console.print(f"Serving {what} {server.runs.root} at {server.url}", highlight=False, markup=False)
    if not is_loopback(args.host):
        console.print(
            f"Warning: --host {args.host} makes the page reachable from other machines on the network, with every"
            " sample of the run; there is no password. Use the default (127.0.0.1) unless you mean it.",
            style="bold yellow", highlight=False, markup=False,
        )
    console.print("Press Ctrl+C to stop.", style="dim", highlight=False, markup=False)
    if args.open:
        webbrowser.open(server.url)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0
