"""Process signals for a running node (``hbone`` and ``twistd -n hbone``).

* SIGTERM, SIGINT: drain (PROTOCOL §3: listeners closed, two GOAWAYs, live tunnels
  get ``drain_timeout`` to finish, then RST_STREAM(CANCEL)) and exit 0. A second
  one ends the drain at once.
* SIGHUP: reload the config file (policy, rules, timeouts, routes, bindings; live
  tunnels the new file no longer allows are reset) and look at the certificate files
  now. Without a config file only the certificates are looked at.

Twisted's own SIGTERM handler records the signal and twistd re-raises it after a
clean shutdown, so the process would die by SIGTERM (exit status -15) even after a
complete drain; these handlers stop the reactor without recording a signal.
"""

from __future__ import annotations

import signal

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["SignalHandlers", "SignalService"]

log = Logger(namespace="hbone")


class SignalHandlers:
    def __init__(self, reactor, nodes, configPath=None) -> None:
        self.reactor = reactor
        self.nodes = list(nodes)
        self.configPath = configPath
        self.stopping = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig, handler in ((signal.SIGTERM, self._onStop), (signal.SIGINT, self._onStop),
                             (signal.SIGHUP, self._onHangup)):
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue  # ignored by whoever started us (a shell's '&', nohup): keep it so
            self._previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    # signal handlers run between bytecodes: hand the work to the reactor
    def _onStop(self, number, frame) -> None:
        self.reactor.callFromThread(self.stop, signal.Signals(number).name)

    def _onHangup(self, number, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def stop(self, name: str = "SIGTERM") -> None:
        if self.stopping:
            log.info("{name} again: resetting what is left and stopping now", name=name)
            for node in self.nodes:
                node.drainNow()
            return
        self.stopping = True
        timeout = max((n.spec.drainTimeout for n in self.nodes), default=0)
        live = sum(len(n.tracker.tunnels) for n in self.nodes)
        log.info("{name}: draining {n} live tunnels (up to {t:g}s; {name} again stops at once)",
                 name=name, n=live, t=timeout)
        # the nodes drain in their stopService, which the shutdown waits for
        if self.reactor.running:
            self.reactor.stop()

    def reload(self) -> None:
        for node in self.nodes:
            if node.certWatcher is not None:
                node.certWatcher.check()
            if self.configPath is not None:
                node.reloadFromFile(self.configPath)
        if self.configPath is None:
            log.info("SIGHUP: certificate files checked; no config file to reload "
                     "(started from the command line)")


class SignalService(Service):
    """Installs :class:`SignalHandlers` once the reactor runs (after Twisted's own)."""

    def __init__(self, reactor, nodes, configPath=None) -> None:
        self.reactor = reactor
        self.handlers = SignalHandlers(reactor, nodes, configPath)

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self.handlers.install)

    # stopService leaves the handlers in place: a second SIGTERM during the drain
    # must still end it (Twisted's handler would make the exit status -15)
