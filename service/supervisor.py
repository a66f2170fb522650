"""The supervisor of `serve --workers N`, in a module of its own: the parent process imports
nothing of the app (its metrics are created in the workers, each under its own pid)."""

from __future__ import annotations

from uvicorn.supervisors.multiprocess import Multiprocess


class Supervisor(Multiprocess):
    """uvicorn's supervisor of `serve --workers N`, which gives up its copy of the listening
    socket on SIGTERM/SIGINT: the socket then closes when the last worker stops listening, and
    new connections are refused. (uvicorn's keeps it open until it exits: meanwhile the kernel
    would accept connections that no one serves, and reset them at the end.)"""

    def handle_term(self) -> None:
        self._release_sockets()
        super().handle_term()

    def handle_int(self) -> None:
        self._release_sockets()
        super().handle_int()

    def _release_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
