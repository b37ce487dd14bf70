# Metadata lives in pyproject.toml; this file keeps `python setup.py develop`-era tools working.
from setuptools import setup

setup()
