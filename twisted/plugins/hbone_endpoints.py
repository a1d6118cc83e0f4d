"""Endpoint string plugins: ``clientFromString(reactor, "hbone:...")`` and
``serverFromString(reactor, "h2r:...")``.

The string's fields are documented in ``hbone/endpoints.py`` and ``docs/embedding.md``.
This file only names the parser; importing it imports nothing heavy.
"""

from hbone.endpoints import HBoneClientParser

hboneClientEndpoint = HBoneClientParser()

from hbone.endpoints import H2RServerParser  # noqa: E402

h2rServerEndpoint = H2RServerParser()
