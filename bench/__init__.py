"""Side-by-side benchmark of hbone against raw TCP, socat, stunnel4 and nghttpx.

``make bench`` or ``python -m bench`` (``--help`` for the options); see
docs/performance.md for a recorded run and how to read it.
"""
