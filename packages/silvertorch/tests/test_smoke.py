"""Smoke tests run from the built wheel in an isolated venv: public API + one tiny call each."""

import silvertorch


def test_version():
    assert silvertorch.__version__.count(".") == 2
