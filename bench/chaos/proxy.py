"""A TCP proxy in front of PostgreSQL that can simulate an outage.

    python -m bench.chaos.proxy --listen 65432 --target 5432 --outage-seconds 20

Forwards 127.0.0.1:LISTEN to 127.0.0.1:TARGET. On SIGUSR1 it closes every open connection
(both sides) and refuses new ones (the listening socket is closed: "connection refused") for
``--outage-seconds``, then listens again. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import signal
import socket
import sys
import threading
import time

HOST = "127.0.0.1"


class Proxy:
    def __init__(self, listen_port: int, target_port: int, outage_seconds: float) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.outage_seconds = outage_seconds
        self.lock = threading.Lock()
        self.pairs: set[tuple[socket.socket, socket.socket]] = set()
        self.listener: socket.socket | None = None
        self.outage_until = 0.0
        self.stopping = False

    # -- listening ---------------------------------------------------------------------------
    def _open_listener(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.listen_port))
        listener.listen(128)
        listener.settimeout(0.2)
        return listener

    def serve(self) -> None:
        while not self.stopping:
            if time.monotonic() < self.outage_until:
                time.sleep(0.05)
                continue
            listener = self.listener
            if listener is None:
                listener = self.listener = self._open_listener()
                log(f"listening on {HOST}:{self.listen_port} -> {HOST}:{self.target_port}")
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                continue  # closed by an outage
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            pair = (client, upstream)
            with self.lock:
                self.pairs.add(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        client, upstream = pair
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while True:
                for key, _ in selector.select(timeout=1.0):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                with self.lock:
                    if pair not in self.pairs:
                        return
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            self._close(pair)

    def _close(self, pair) -> None:
        with self.lock:
            self.pairs.discard(pair)
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    # -- faults ------------------------------------------------------------------------------
    def outage(self, *_args) -> None:
        self.outage_until = time.monotonic() + self.outage_seconds
        listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        with self.lock:
            pairs = list(self.pairs)
        for pair in pairs:
            self._close(pair)
        log(f"OUTAGE: closed {len(pairs)} connection(s); refusing for {self.outage_seconds:.0f} s")

    def stop(self, *_args) -> None:
        self.stopping = True


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} proxy: {message}\n")
    sys.stderr.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, default=65432)
    parser.add_argument("--target", type=int, default=5432)
    parser.add_argument("--outage-seconds", type=float, default=20.0)
    args = parser.parse_args()
    proxy = Proxy(args.listen, args.target, args.outage_seconds)
    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=proxy.outage, daemon=True).start())
    signal.signal(signal.SIGTERM, proxy.stop)
    signal.signal(signal.SIGINT, proxy.stop)
    proxy.serve()


if __name__ == "__main__":
    main()
