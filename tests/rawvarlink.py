# SPDX-License-Identifier: LGPL-2.1-or-later
"""One raw varlink call (NUL-terminated JSON), the way varlinkctl does it.

Stdlib only: tests also run this file's source with the system python as another user
(``python3 -c SOURCE SOCKET METHOD PARAMETERS``, see ``tests.conftest.call_as``), where the
checkout and its venv may not be readable.
"""

import json
import socket
import sys


def call(path, method, parameters=None, more=False, timeout=10.0):
    """The first reply to ``method`` on the socket at ``path``, as a dict."""
    msg = {"method": method, "parameters": parameters or {}}
    if more:
        msg["more"] = True
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(msg).encode() + b"\0")
        data = b""
        while not data.endswith(b"\0"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.split(b"\0")[0])


def list_all(path, method="io.vmspawnd.Manager.List"):
    """One streamed call (``more``) read to its last reply; the number of replies."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(json.dumps({"method": method, "parameters": {}, "more": True}).encode() + b"\0")
        data, replies = b"", 0
        while chunk := s.recv(1 << 20):
            data += chunk
            *messages, data = data.split(b"\0")
            for message in messages:
                replies += 1
                # (parsing every reply would time this client: only one without continues is parsed)
                if not message.startswith(b'{"continues":true') and not json.loads(message).get("continues"):
                    return replies
    raise ConnectionError("the call ended before its last reply")


if __name__ == "__main__":
    print(json.dumps(call(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), timeout=120)))
