"""Shareable links: the page address, the query string of a result, and a guard for links too long to serve.

A link carries the settings (`?prompt=...&seed=...`); `Handlers.prefill` fills the page from it. A link
longer than `MAX_QUERY_BYTES` (gradio cannot parse page URLs past 64 KiB) is redirected to the same
link with the prompt cut to the limit and `CUT_MARK` added, so the page loads and says what was cut.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import gradio as gr
from gradio import route_utils

from sd35fp8.request import GenerationRequest
from sd35fp8.settings import LIMITS

MAX_QUERY_BYTES = 16_384
CUT_MARK = "cut"
LINK_PARAMS = ("prompt", "negative", "seed", "steps", "guidance", "width", "height", "precision", "tab")


def page_url(request: gr.Request | None) -> str:
    """The address of the page the user is on (no query), for permalinks; "" when unknown."""
    if request is None:
        return ""
    headers = {k.lower(): v for k, v in dict(getattr(request, "headers", None) or {}).items()}
    referer = headers.get("referer")
    if referer and "/gradio_api/" not in referer:
        parts = urlsplit(referer)
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))
    try:
        raw = request.request
        if raw is not None:
            return route_utils.get_root_url(raw, route_utils.get_api_call_path(raw), None) + "/"
    except (AttributeError, ValueError):
        pass
    host = headers.get("x-forwarded-host") or headers.get("host")
    proto = headers.get("x-forwarded-proto", "http").split(",")[0]
    return f"{proto}://{host}/" if host else ""


def permalink_query(request: GenerationRequest, precision: str | None = None, tab: str | None = None) -> str:
    """The query string that reproduces `request` on the page (`?prompt=...&seed=...`)."""
    params = {"prompt": request.prompt}
    if request.negative_prompt:
        params["negative"] = request.negative_prompt
    params.update(seed=request.seed, steps=request.steps, guidance=f"{request.guidance:g}",
                  width=request.width, height=request.height)
    if precision:
        params["precision"] = precision
    if tab:
        params["tab"] = tab
    return "?" + urlencode(params)


def escape_markdown(text: str) -> str:
    """`text` with Markdown/HTML specials escaped, so values from a link are shown, never rendered."""
    return "".join("\\" + char if char in "\\`*_{}[]()<>#+-.!|~&" else char for char in text)


def shortened_query(query: str) -> str:
    """`query` with only the link's own parameters, each cut to the prompt limit, and `CUT_MARK` added."""
    kept = [(key, value[: LIMITS.prompt_chars]) for key, value in parse_qsl(query, keep_blank_values=True)
            if key in LINK_PARAMS]
    return urlencode([*kept, (CUT_MARK, "1")])


class LongLinkGuard:
    """ASGI middleware: a page request whose query is over `MAX_QUERY_BYTES` is redirected to a shortened one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        query = scope.get("query_string", b"")
        if scope["type"] != "http" or len(query) <= MAX_QUERY_BYTES or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        location = scope.get("root_path", "") + scope.get("path", "/") + "?" + shortened_query(
            query.decode("latin-1"))
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
