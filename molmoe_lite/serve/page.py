"""The web page at ``/``: plain HTML, CSS and JavaScript files shipped in ``static/``.

No build step and nothing fetched from elsewhere: the page talks only to this server
(its Content-Security-Policy says so, and a browser enforces it). It reads the chosen
image as a data URL, streams the answer from ``/v1/chat/completions`` and draws any
points of the last chunk on the image.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from molmoe_lite.serve.errors import APIError

# 'self' only: no CDN, no remote fonts; images the user picks come as data: / blob: URLs
CSP = ("default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
_FILES = ("index.html", "page.css", "page.js", "favicon.svg")


def _read(name: str) -> bytes:
    return resources.files("molmoe_lite.serve").joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    suffix = name[name.rfind("."):]
    return Response(_read(name), media_type=_TYPES[suffix],
                    headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff"})


async def index(request: Request) -> Response:
    return _file("index.html")


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in _FILES:  # a fixed list: no path ever reaches the file system from a URL
        raise APIError(404, f"no static file {name!r}", code="not_found")
    return _file(name)
