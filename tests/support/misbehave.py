"""A stand-in for `ollama serve` that misbehaves on request, for the supervisor's tests.

    python tests/support/misbehave.py [serve] [--port N] [--exit-at-once] [--never-healthy] [--ignore-sigterm]
        [--exit-after S] [--crash-after-ready S] [--ready-after S] [--spawn-child] [--env-file PATH]

When healthy it answers like Ollama: `GET /` and `HEAD /` -> "Ollama is running", `GET /api/version`,
`GET /api/tags` and `GET /api/ps` -> empty lists. Without --port it listens where OLLAMA_HOST says,
like the real server. --spawn-child starts a grandchild in the same process group (as Ollama starts
its llama-server runners) whose pid is served at `GET /misbehave/pids`. Standard library only, so it
starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", nargs="?", default="serve")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--exit-at-once", action="store_true", help="print an error and exit 3")
    parser.add_argument("--never-healthy", action="store_true", help="run, but never listen")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--exit-after", type=float, default=0.0, help="exit 1 after S seconds, healthy or not")
    parser.add_argument("--crash-after-ready", type=float, default=0.0, help="serve, then exit 2 after S seconds")
    parser.add_argument("--ready-after", type=float, default=0.0, help="wait S seconds before listening")
    parser.add_argument("--spawn-child", action="store_true", help="start a long-lived grandchild")
    parser.add_argument("--env-file", default="", help="write the environment received as JSON here")
    return parser.parse_args(argv)


def listen_address(port: int) -> tuple[str, int]:
    if port:
        return "127.0.0.1", port
    host, _, port_text = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    return host or "127.0.0.1", int(port_text)


def make_handler(pids: dict[str, Any]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            if self.path == "/":
                self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
                return
            routes: dict[str, Any] = {
                "/api/version": {"version": "0.0.0-misbehave"},
                "/api/tags": {"models": []},
                "/api/ps": {"models": []},
                "/misbehave/pids": pids,
            }
            if self.path in routes:
                self._send(200, json.dumps(routes[self.path]).encode(), "application/json; charset=utf-8")
            else:
                self._send(404, b'{"error":"not found"}', "application/json; charset=utf-8")

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet, like a healthy server should be

    return Handler


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.env_file:
        with open(args.env_file, "w") as f:
            json.dump(dict(os.environ), f)
    print(f"misbehave pid={os.getpid()} starting", flush=True)
    if args.exit_at_once:
        print("Error: could not initialize the fake GPU (exit-at-once)", file=sys.stderr, flush=True)
        return 3
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids: dict[str, Any] = {"pid": os.getpid(), "children": []}
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        pids["children"].append(child.pid)
        print(f"misbehave child pid={child.pid}", flush=True)
    if args.exit_after:

        def exit_now() -> None:
            print("exit-after", file=sys.stderr, flush=True)
            os._exit(1)

        timer = threading.Timer(args.exit_after, exit_now)
        timer.daemon = True
        timer.start()
    if args.never_healthy:
        while True:
            time.sleep(3600)
    if args.ready_after:
        time.sleep(args.ready_after)
    host, port = listen_address(args.port)
    server = ThreadingHTTPServer((host, port), make_handler(pids))
    server.daemon_threads = True
    if args.crash_after_ready:

        def crash() -> None:
            print("panic: crash-after-ready", file=sys.stderr, flush=True)
            os._exit(2)

        timer = threading.Timer(args.crash_after_ready, crash)
        timer.daemon = True
        timer.start()
    print(f"misbehave listening on {host}:{port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
