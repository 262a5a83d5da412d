"""The dashboard: a page and its script and style, served from the package, read once.

The page holds no inline script or style, and says so in its Content-Security-Policy: scripts,
styles and requests only from the gateway itself, no forms sent anywhere, no framing. The key
stays out of URLs: the script keeps it in sessionStorage and sends it in the Authorization
header of its requests to the usage API.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (resources.files("inference_gateway.portal") / "static" / name).read_bytes()


def _static(body: bytes, content_type: str) -> web.Response:
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=HEADERS)


def add_routes(app: web.Application) -> None:
    page = _read("dashboard.html")
    files = {name: (_read(name), kind) for name, kind in FILES.items()}

    async def index(request: web.Request) -> web.Response:
        return _static(page, "text/html")

    async def asset(request: web.Request) -> web.Response:
        body, kind = files[request.match_info["name"]]
        return _static(body, kind)

    app.router.add_get("/dashboard", index)
    app.router.add_get("/dashboard/", index)
    app.router.add_get("/dashboard/{name:" + "|".join(n.replace(".", r"\.") for n in files)
                       + "}", asset)
