"""twistd dropin: ``twistd -n hbone -L ... -F ...`` runs an hbone node."""

from twisted.application.service import ServiceMaker

hbone = ServiceMaker(
    "hbone",
    "hbone.tap",
    "HBONE tunnels: TCP over HTTP/2 CONNECT inside mutual TLS (SPIFFE)",
    "hbone",
)
