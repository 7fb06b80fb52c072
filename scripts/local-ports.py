"""Print this checkout's local SuperLink ports: "HTTP_API_PORT CONTROL_API_PORT".

`flwr run . local` starts (or reuses) a SuperLink on 127.0.0.1 at two ports that are the
same for every checkout unless FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and
FLWR_LOCAL_CONTROL_API_PORT move them; two checkouts would then share one SuperLink, its
venv and its cleanup. This picks a pair derived from the checkout's path (stable across
shells), reuses the pair of this checkout's SuperLink while it runs, and moves on to the
next pair while another process holds one.

Usage: python scripts/local-ports.py CHECKOUT_DIR FLWR_HOME
       python scripts/local-ports.py --check FLWR_HOME HTTP_PORT
         exit 1 with a message when something other than this FLWR_HOME's SuperLink
         listens on HTTP_PORT (run-default.sh refuses to submit there).
"""

import hashlib
import socket
import sys
from pathlib import Path

FIRST, LAST = 40000, 59998  # even HTTP port, control port = HTTP + 1


def free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def running_pair(flwr_home: Path) -> tuple[int, int] | None:
    """Ports of the SuperLink already running for this FLWR_HOME, from its command line."""
    marker = str(flwr_home / "local-superlink" / "superlink.log")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0")]
        except (OSError, UnicodeDecodeError):
            continue
        if marker in args and "--port" in args and "--control-api-address" in args:
            http = int(args[args.index("--port") + 1])
            control = int(args[args.index("--control-api-address") + 1].rsplit(":", 1)[1])
            return http, control
    return None


def main(checkout: str, flwr_home: str) -> None:
    pair = running_pair(Path(flwr_home))
    if pair is None:
        digest = int(hashlib.sha256(str(Path(checkout).resolve()).encode()).hexdigest(), 16)
        slots = (LAST - FIRST) // 2
        for step in range(200):
            http = FIRST + 2 * ((digest + step) % slots)
            if free(http) and free(http + 1):
                pair = (http, http + 1)
                break
        else:
            raise SystemExit("no free pair of local SuperLink ports found in 40000-59999")
    print(*pair)


def check(flwr_home: str, http: str) -> None:
    pair = running_pair(Path(flwr_home))
    if not free(int(http)) and (pair is None or pair[0] != int(http)):
        raise SystemExit(
            f"127.0.0.1:{http} is held by a process that is not this checkout's local "
            f"SuperLink (FLWR_HOME={flwr_home}); refusing to submit a run to it. Unset "
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and FLWR_LOCAL_CONTROL_API_PORT and source "
            "scripts/flwr-env.sh again to get free ports."
        )


if __name__ == "__main__":
    if sys.argv[1] == "--check":
        check(*sys.argv[2:4])
    else:
        main(*sys.argv[1:3])
