"""An HTTP/1.1 server core for the ``/v1`` path: an ``asyncio.Protocol`` over llhttp.

Opt-in (``HTTP_CORE=protocol``). It parses requests with ``httptools`` (llhttp, the parser Node
uses) and hands each one for a forwarded endpoint straight to ``ProxyHandler.serve``, which
saves 55-110 µs of CPU per request against aiohttp's server; with every feature of the gateway
on that is 1.37x the requests per second at 32 connections with one worker and 1.58x with two
(medians over three runs), short with one worker of the 1.5x that would make it the default
(docs/performance.md, "The server core"). Everything else on the port (probes,
``/metrics``, the usage API and the dashboard, ``/v1/models``) stays with the aiohttp
application, in the same process: see ``connection`` for how a connection is handed over.

  request      what the handler reads: method, path, headers, the body as it arrives
  response     writing an answer: whole, or streamed in chunks with the socket's backpressure
  connection   one client connection: parsing, pipelining, timeouts, the hand-over to aiohttp
  core         the listening socket, the connections' deadlines, and a graceful stop
"""

from inference_gateway.proxy.http.core import Limits, ServerCore

__all__ = ["Limits", "ServerCore"]
