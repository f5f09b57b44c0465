"""smartroute.errors: one tree under SmartRouteError, every class importable from the package."""

from __future__ import annotations

import inspect

import smartroute
from smartroute import errors


def error_classes() -> list[type[BaseException]]:
    return [
        value
        for _, value in inspect.getmembers(errors, inspect.isclass)
        if issubclass(value, BaseException) and value.__module__ == errors.__name__
    ]


def test_every_error_is_a_smartroute_error() -> None:
    classes = error_classes()
    assert len(classes) >= 14
    assert all(issubclass(cls, smartroute.SmartRouteError) for cls in classes)


def test_every_error_is_exported_by_the_package() -> None:
    for cls in error_classes():
        assert cls.__name__ in smartroute.__all__, cls.__name__
        assert getattr(smartroute, cls.__name__) is cls
