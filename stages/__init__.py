"""Pipeline stages: plain computation over arrays and paths. No stage imports another.

The public Python API (:mod:`stages.api`, the one module that composes the stages)::

    graph = stages.build_class_graph(class_names)
    issues = stages.find_label_issues(features, labels, graph=graph)

Its names are loaded on first use, so importing one stage module does not load the others.
The prototypes alone are :func:`stages.api.build_prototypes` (``stages.make_prototypes`` is the
stage module).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "build_class_graph",
    "build_prototypes",
    "find_label_issues",
    "ClassGraph",
    "Prototypes",
    "LabelIssues",
    "ScoreConfig",
    "PrototypeConfig",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'stages' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
