"""Who may reach the server: binding beyond loopback needs authentication, or an explicit insecure flag.

Used by ``serve.py`` (``make run``) before the server starts and by the app itself, so that a plain
``monailabel start_server`` (whose default host is 0.0.0.0) is refused as well. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from langmamba.errors import ConfigError

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) binds to this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_host(argv: list[str]) -> str | None:
    """The ``--host`` of a ``monailabel start_server`` command line (MONAI Label's default 0.0.0.0), else None."""
    if "start_server" not in argv:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--host", default="0.0.0.0")
    return parser.parse_known_args(argv[argv.index("start_server") + 1 :])[0].host


def check_exposure(insecure: bool, argv: list[str] | None = None) -> None:
    """Refuse to serve beyond loopback without authentication unless ``insecure`` (``--conf insecure true``)."""
    from monailabel.config import settings

    host = server_host(sys.argv if argv is None else argv)
    if host is None or is_loopback(host) or settings.MONAI_LABEL_AUTH_ENABLE:
        return
    if not insecure:
        raise ConfigError(
            f"refusing to serve on {host} without authentication: anyone who reaches this address "
            "could read every study. Turn authentication on (MONAI_LABEL_AUTH_ENABLE, see "
            "SECURITY.md), bind to 127.0.0.1, or pass --conf insecure true"
        )
    logger.warning("INSECURE: serving on %s without authentication (--conf insecure true)", host)
