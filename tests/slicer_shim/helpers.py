"""Helpers of the Slicer module tests: the module's paths and a deliberately slow HTTP server.

The slow server stands in for a MONAI Label server that hangs (a real one cannot be made to): it accepts
connections on a loopback port and answers only after ``delay`` seconds, so timeouts, cancelling and the
panel's responsiveness during a request can be tested.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "slicer_extension" / "LangMambaDenoise"


class SlowServer:
    """A loopback HTTP server answering every request with 503 after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requests = 0
        self._release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                owner.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                owner._release.wait(owner.delay)
                try:
                    self.send_response(503, "Busy")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
