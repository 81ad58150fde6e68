"""A hash of the code that decides a trained member's predictions.

Cached member predictions and reused ensembles are keyed on their data, settings and seeds; this
adds the code, so that a result computed by an older trainer, augmentation, network or
preprocessing is never reused as if the current code had produced it. It hashes the modules'
syntax trees without docstrings: editing a comment, a docstring or the layout retrains nothing
(a vgg16_paper ensemble is hours of work); any change to the code itself does.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def source_fingerprint(sources: Iterable[str]) -> str:
    """16 hex digits over the sources' syntax trees (no docstrings, comments or positions)."""
    h = hashlib.sha256()
    for src in sources:
        h.update(ast.dump(_strip_docstrings(ast.parse(src)), include_attributes=False).encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The training modules, and the functions that turn a trained member into the cached
    probabilities (the rest of their modules, e.g. saving, does not change results)."""
    from xrdmatch.training import augment, augment_step, evaluation, networks, preprocess, trainer
    from xrdmatch.training.ensemble import Ensemble

    modules = (augment, augment_step, networks, preprocess, trainer)
    functions = (Ensemble.predict_proba, Ensemble._models, evaluation.train_predict)
    return source_fingerprint([*(Path(m.__file__).read_text() for m in modules),
                               *(textwrap.dedent(inspect.getsource(f)) for f in functions)])
