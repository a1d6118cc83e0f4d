#!/usr/bin/env python3
"""Serve a twisted.web site through an HBONE listener, and fetch it through a tunnel.

    python examples/serve_web_through_hbone.py              # throwaway certificates
    python examples/serve_web_through_hbone.py --certs DIR  # DIR/server and DIR/client

Everything listens on 127.0.0.1, on ports the OS picks:

    Agent --(hbone: endpoint)--> mTLS HTTP/2 CONNECT --> hbone Node --> twisted.web site

--certs DIR takes two identity directories in Istio's layout (cert-chain.pem,
key.pem, root-cert.pem), as `hbone certs issue` writes them: DIR/server for the
node, DIR/client for the fetching side.
"""

import argparse
import tempfile
import warnings
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString, quoteStringArgument
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

import hbone

# Twisted warns whenever readBody reads an Agent response, over TCP too.
warnings.filterwarnings("ignore", "Using readBody with a transport", DeprecationWarning)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from twisted.web, through an HBONE tunnel\n"


@implementer(IAgentEndpointFactory)
class ThroughHBone:
    """Agent's endpoints: each URL's host:port becomes the target of a tunnel."""

    def __init__(self, reactor, hboneFields):
        self.reactor = reactor
        self.hboneFields = hboneFields

    def endpointForURI(self, uri):
        target = quoteStringArgument(f"{uri.host.decode()}:{uri.port}")  # ':' -> '\:'
        return clientFromString(self.reactor, f"hbone:{self.hboneFields}:target={target}")


def identities(certs, scratch):
    """(server directory, client directory): the given ones, or freshly minted."""
    if certs:
        return Path(certs, "server"), Path(certs, "client")
    from hbone.ca import ensureDevIdentity

    dirs = ensureDevIdentity(scratch, "cluster.local", {
        "server": "spiffe://cluster.local/ns/default/sa/server",
        "client": "spiffe://cluster.local/ns/default/sa/client",
    })
    return dirs["server"], dirs["client"]


async def main(reactor, certs, scratch):
    serverCerts, clientCerts = identities(certs, scratch)

    # a twisted.web site on 127.0.0.1
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(Hello()))
    webPort = web.getHost().port

    # an hbone node: an HBONE listener whose policy lets tunnels reach the site
    node = hbone.makeNode(reactor, listen=["hbone://127.0.0.1:0"], certs=serverCerts,
                          allow=[f"127.0.0.1:{webPort}"])
    closed = defer.Deferred()

    def onEvent(event):
        if isinstance(event, hbone.TunnelClosed) and not closed.called:
            closed.callback(event)

    node.events.subscribe(onEvent)
    await node.startListening()
    node.startService()
    hbonePort = node.boundPorts()["hbone://127.0.0.1:0"]

    # fetch the site through a tunnel: Agent over the hbone: client endpoint
    serverId = hbone.Identity.fromDirectory(serverCerts).localId
    fields = ":".join([
        "host=127.0.0.1",
        f"port={hbonePort}",
        f"certs={quoteStringArgument(str(clientCerts))}",
        f"identity={quoteStringArgument(str(serverId))}",  # spiffe\://cluster.local/...
    ])
    try:
        agent = Agent.usingEndpointFactory(reactor, ThroughHBone(reactor, fields))
        response = await agent.request(b"GET", f"http://127.0.0.1:{webPort}/".encode())
        page = await readBody(response)
        print(f"page: {response.code} {page.decode().strip()}")
        event = await closed.addTimeout(10, reactor)
        print(f"event: TunnelClosed {event.direction} {event.peer} -> {event.target}: "
              f"{event.bytesUp} bytes up, {event.bytesDown} bytes down, reason={event.reason}")
    finally:
        await hbone.closeEndpointPools(reactor)
        await node.stopService()
        await web.stopListening()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certs", help="a directory holding server/ and client/ identity directories")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hbone-example-") as scratch:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, options.certs, scratch)))
