"""A TCP proxy on 127.0.0.1 in front of a real server, that turns faults on and off for new requests.

Modes (``proxy.mode``), applied to each chunk a client sends, so a kept-alive connection follows the switch:

- ``"pass"``: forward both ways.
- ``"down"``: close the connection without an answer (the client sees the server as unreachable).
- ``"error"``: answer ``503 Service Unavailable`` and close.
- ``"slow"``: forward after ``proxy.delay`` seconds (the server answers late).

The server behind it is real (``tests/mlflow_server.py``): what it stores is what the client sent through.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

_ERROR = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.delay = 0.0
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    def uri(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            while True:
                chunk = client.recv(65536)
                if not chunk or self.mode == "down":
                    return
                if self.mode == "error":
                    client.sendall(_ERROR)
                    client.shutdown(socket.SHUT_WR)
                    client.settimeout(1.0)  # read what the client still sends: closing on unread data resets
                    while client.recv(65536):
                        pass
                    return
                if self.mode == "slow":
                    time.sleep(self.delay)
                if upstream is None:
                    upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                    threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
                upstream.sendall(chunk)
        except OSError:
            return
        finally:
            for end in (client, upstream):
                if end is not None:
                    end.close()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            target.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
