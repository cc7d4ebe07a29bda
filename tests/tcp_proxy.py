"""A TCP proxy on loopback for fault tests: every byte between a client and a server passes through it, so a test can
slow each call (`delay_s`), cut the link for a while (`cut`: bytes wait, as in a network partition, and arrive when it
heals), or lose the server's replies (`drop_replies`: the server runs the call, the client never hears back).
`ProxyProcess` runs one in a process of its own."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time

from tests.servers import ROOT, free_port


class ProxyProcess:
    """A `TcpProxy` in its own process, with the same controls (cut, heal, delay)."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.tcp_proxy", str(target_port), str(self.port)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the proxy process did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()

    def cut(self) -> None:
        self._say("cut")

    def heal(self) -> None:
        self._say("heal")

    def delay(self, seconds: float) -> None:
        self._say(f"delay {seconds}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class TcpProxy:
    def __init__(self, target_port: int, delay_s: float = 0.0, port: int | None = None):
        self.target_port, self.delay_s = target_port, delay_s
        self.port = port or free_port()
        self.drop_replies = False
        self._healed = threading.Event()
        self._healed.set()
        self._closed = False
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """From now on no byte crosses (they wait) until `heal`."""
        self._healed.clear()

    def heal(self) -> None:
        self._healed.set()

    def close(self) -> None:
        self._closed = True
        self._healed.set()
        self._server.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                if self._closed:
                    return
                with contextlib.suppress(NameError, OSError):
                    client.close()
                continue
            self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while data := src.recv(65536):
                self._healed.wait()
                if request and self.delay_s:
                    time.sleep(self.delay_s)
                if not request and self.drop_replies:
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def main() -> None:
    """`python -m tests.tcp_proxy TARGET_PORT PORT`: a proxy in a process of its own (so a busy test process cannot
    slow it), steered by lines on stdin: `cut`, `heal`, `delay SECONDS`."""
    import sys

    proxy = TcpProxy(int(sys.argv[1]), port=int(sys.argv[2]))
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "cut":
            proxy.cut()
        elif cmd == "heal":
            proxy.heal()
        elif cmd == "delay":
            proxy.delay_s = float(arg[0])
        print("ok", flush=True)


if __name__ == "__main__":
    main()
