"""The Long tier of SECURITY §5 (not part of ``make test``): ``make soak`` (S51),
``make fuzz`` (S56), ``make tlsscan`` (S57)."""
