"""A child process for S45: an hbone server on a :class:`hbone.limits.LimitedPort`
with few file descriptors left.

``python -m tests.adversarial.emfile_node CHAIN KEY CA SPARE PAUSE``

It listens (HBONE on 127.0.0.1 with the given SVID, plus an echo target that the
destination policy allows), then lowers its soft RLIMIT_NOFILE to its open
descriptors + SPARE, and prints one JSON line with the two ports. Each ``stats``
line on stdin is answered with a JSON line of counters (accept attempts,
EMFILE pauses, connections accepted, rejection log lines); ``quit`` exits.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def main(argv: list[str]) -> int:
    chain, key, ca, spare, pause = argv[1], argv[2], argv[3], int(argv[4]), float(argv[5])

    from twisted.internet import protocol, reactor, stdio
    from twisted.logger import formatEvent, globalLogPublisher
    from twisted.protocols.basic import LineReceiver

    from hbone.dialer import DirectDialer
    from hbone.h2.server import TunnelServer, hboneServerFactory
    from hbone.limits import listenLimited
    from hbone.policy import DestinationPolicy, PeerAuthorizer, ReactorResolver, parseAllowEntry
    from hbone.splice import TunnelTracker
    from hbone.tls import Identity

    lines: list[str] = []

    def observe(event) -> None:
        text = formatEvent(event) or ""
        if "cannot accept" in text or event.get("log_failure") is not None:
            lines.append(text if event.get("log_failure") is None else "Traceback: " + text)

    globalLogPublisher.addObserver(observe)

    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    targetPort = echo.getHost().port
    identity = Identity.fromFiles(chain, key, ca)
    policy = DestinationPolicy([parseAllowEntry(f"127.0.0.1:{targetPort}")])
    server = TunnelServer(reactor, DirectDialer(reactor, policy, ReactorResolver(reactor)),
                          PeerAuthorizer(identity.localId), TunnelTracker(reactor))
    port = listenLimited(reactor, 0, hboneServerFactory(reactor, identity, server), backlog=256,
                         interface="127.0.0.1", emfilePause=pause)

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            command = line.strip().decode()
            if command == "stats":
                self.sendLine(json.dumps({
                    "acceptAttempts": port.acceptAttempts,
                    "resourceErrors": port.resourceErrors,
                    "accepted": port.sessionno,
                    "accepting": port.accepting,
                    "logLines": lines,
                }).encode())
            elif command == "quit":
                reactor.stop()

        def connectionLost(self, reason=None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Control())
    openNow = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (openNow + spare, hard))
    sys.stdout.write(json.dumps({"port": port.getHost().port, "target": targetPort}) + "\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
