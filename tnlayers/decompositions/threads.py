"""Intra-op threads for the decompositions: one thread, except for the few large products.

A decomposition is a long sequence of small operations (eigh, QR, Cholesky of <= ~1000-sized matrices, R x R
Grams, thin contractions) around a few large products (Grams of unfoldings, mode products of the whole
tensor). On a loaded machine every OpenMP region waits until all its threads get a core, so the small
operations ran 3-100x slower with 2 threads than with 1 on a shared 2-core VM (eigh of a 256 x 256 Gram 0.02 s
against up to 1.3 s; an 11 x 11 Cholesky 8 ms against microseconds; CP-ALS of a 3x7x7x64 conv 5.4 s against
0.07 s), while on an idle machine a second thread gains them little. So the routines run under
``one_thread()``, and ``threads_for(work)`` gives a large product torch's own thread count back.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch

__all__ = ["PARALLEL_WORK", "one_thread", "threads_for", "mostly_one_thread"]

# Multiply-adds from which a product runs on all of torch's threads: below, a second thread saves < ~1 ms.
PARALLEL_WORK = 1 << 25

_state = threading.local()  # .full: the thread count the outermost one_thread() lowered
F = TypeVar("F", bound=Callable)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore torch's count (nested blocks are no-ops).

        >>> with one_thread():
        ...     torch.get_num_threads()
        1
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    previous = getattr(_state, "full", None)
    _state.full = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _state.full = previous


@contextmanager
def threads_for(work: int) -> Iterator[None]:
    """For ``work`` (multiply-adds) of at least ``PARALLEL_WORK``: torch's thread count (the one an enclosing
    ``one_thread()`` lowered, if any); below: one thread.

        >>> with threads_for(10):
        ...     torch.get_num_threads()
        1
    """
    if work < PARALLEL_WORK:
        with one_thread():
            yield
        return
    full = getattr(_state, "full", None)
    if full is None or torch.get_num_threads() == full:
        yield
        return
    torch.set_num_threads(full)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def mostly_one_thread(fn: F) -> F:
    """Decorator: ``fn`` runs under ``one_thread()`` (its large products inside ``threads_for`` still get all
    threads).

        >>> mostly_one_thread(torch.get_num_threads)()
        1
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_thread():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
