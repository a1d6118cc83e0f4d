"""hbone: HBONE tunnels (HTTP/2 CONNECT over mutual TLS) on Twisted."""

__version__ = "0.1.0"
