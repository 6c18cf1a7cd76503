"""The Hugging Face Hub as tests see it: huggingface_hub's HTTP requests answered by a fake in this process (the
Hub's servers cannot be reached from CI, and a test must see exactly what is sent)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import httpx


@contextlib.contextmanager
def hub_answered_by(fake: Callable[[httpx.Request], httpx.Response]) -> Iterator:
    """Until the block ends, every request huggingface_hub makes goes to `fake` (what httpx.MockTransport takes),
    through huggingface_hub's own request hook, as a real request would. Yields `fake`."""
    from huggingface_hub.utils import _http

    _http.set_client_factory(
        lambda: httpx.Client(
            transport=httpx.MockTransport(fake),
            follow_redirects=True,
            event_hooks={"request": [_http.hf_request_event_hook]},
        )
    )
    try:
        yield fake
    finally:
        _http.set_client_factory(_http.default_client_factory)
