"""The local control socket: a unix socket, mode 0600, one JSON line each way.

Request ``{"op": NAME, ...args}``; answer ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": sentence}``. The server side lives in the agent; the
blocking client here is what the CLI uses.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from shoal.agent.errors import AgentNotRunning, ControlError

CLIENT_TIMEOUT_S = 15.0


def request(path: Path, op: str, timeout_s: float = CLIENT_TIMEOUT_S, **args: Any) -> Any:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise AgentNotRunning(
                f"no node agent answers at {path}; start it with 'shoal node run' "
                "(or check --config/--node, SHOAL_CONFIG/SHOAL_NODE)."
            ) from err
        except PermissionError as err:
            raise AgentNotRunning(f"no permission to use the control socket {path}; run as root.") from err
        s.sendall((json.dumps({"op": op, **args}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                raise AgentNotRunning(f"the node agent at {path} closed the connection without answering.")
            buf += chunk
    except TimeoutError as err:
        raise AgentNotRunning(
            f"the node agent at {path} did not answer within {timeout_s:g} s (is it frozen?)."
        ) from err
    finally:
        s.close()
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer.get("result")
