"""setup.cfg holds the metadata and dependencies; this file names the packages.

``twisted/plugins`` has no ``__init__.py`` (Twisted's plugin system requires that),
so setup.cfg's ``find:`` cannot see it; it is added here.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["hbone", "hbone.*"]) + ["twisted.plugins"],
)
