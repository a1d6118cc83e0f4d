"""Endpoint string plugins: ``clientFromString(reactor, "hbone:...")``.

The string's fields are documented in ``hbone/endpoints.py`` and ``docs/embedding.md``.
This file only names the parser; importing it imports nothing heavy.
"""

from hbone.endpoints import HBoneClientParser

hboneClientEndpoint = HBoneClientParser()
