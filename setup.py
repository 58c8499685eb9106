"""Packages are found, not listed: every package under hf_longctx/, plus the presets that live in patches/.

Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["hf_longctx", "hf_longctx.*"]), "hf_longctx.presets"])
