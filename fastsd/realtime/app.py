"""The Starlette app: the page at /, the websocket at /ws, and /health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..inputs import MAX_SEED
from .backend import OUTPUT_FORMATS, PARAMETERS, Backend
from .session import Session
from .settings import Access, Limits

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere, and talks only to this server.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'"
)
# Close codes (RFC 6455): policy violation (access), try again later (full), normal (idle).
REFUSED, FULL, IDLE = 1008, 1013, 1000


class PagePolicy:
    """Adds the Content-Security-Policy header to every HTTP response (pure ASGI middleware)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_policy(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"content-security-policy", PAGE_POLICY.encode())]
            await send(message)

        await self.app(scope, receive, with_policy if scope["type"] == "http" else send)


class Realtime:
    """The server's state: the backend, the limits and access rules, the sessions connected."""

    def __init__(self, backend: Backend, limits: Limits, access: Access):
        self.backend, self.limits, self.access = backend, limits, access
        self.sessions: set[Session] = set()

    def hello(self, session: Session) -> dict:
        variant, passes, limits = self.backend.variant, self.backend.passes, self.limits
        return {
            "type": "ready",
            "backend": self.backend.description,
            "variant": variant.name,
            "width": variant.realtime_side or variant.width,
            "height": variant.realtime_side or variant.height,
            "painting": "image-to-image",  # what a painted frame drives (the page says so)
            "max_pixels": variant.max_pixels,
            "max_steps": variant.max_steps,
            "seed": session.params["seed"],
            "passes": {
                "fast": {"num_inference_steps": passes.fast_steps, "vae": passes.fast_vae},
                "refined": {"num_inference_steps": passes.refined_steps, "vae": passes.refined_vae},
            },
            "parameters": list(PARAMETERS),
            "output_formats": list(OUTPUT_FORMATS),
            "limits": {
                "max_frame_bytes": limits.max_frame_bytes,
                "max_frame_pixels": limits.max_frame_pixels,
                "max_messages_per_second": limits.max_messages_per_second,
                "idle_timeout": limits.idle_timeout,
            },
        }

    async def serve(self, websocket: WebSocket) -> None:
        """One client's websocket: admitted, then its messages until it goes, idles or is refused."""
        refusal = self.access.refusal(websocket.headers, websocket.query_params)
        if refusal:
            await _refuse(websocket, "access", f"refused: {refusal}.", REFUSED)
            return
        if len(self.sessions) >= self.limits.max_connections:
            full = f"the server serves at most {self.limits.max_connections} connections at once; try again later."
            await _refuse(websocket, "connections", full, FULL)
            return
        await websocket.accept()
        session = Session(self.backend, self.limits, websocket, seed=random.randint(0, MAX_SEED))
        self.sessions.add(session)
        worker = asyncio.create_task(session.run())
        # A client that stops reading for the idle timeout ends its session: close the socket too.
        worker.add_done_callback(lambda task: task.cancelled() or asyncio.ensure_future(_close(websocket)))
        try:
            await session.send(self.hello(session))
            await self._receive(websocket, session)
        except TimeoutError:
            with contextlib.suppress(Exception):
                idle = f"closed after {self.limits.idle_timeout:g} s without a message (idle_timeout)."
                await session.error("idle", idle)
                await websocket.close(IDLE)
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client went (RuntimeError: the socket was closed)
            pass
        finally:
            # The client is gone: its pending input goes, and its running work is canceled
            # (fastsd.batching drops it; other clients' work in the same call goes on).
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
            self.sessions.discard(session)

    async def _receive(self, websocket: WebSocket, session: Session) -> None:
        while True:
            async with asyncio.timeout(self.limits.idle_timeout):
                message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if not session.allow_message():
                await session.refuse_for_rate()
            elif message.get("bytes") is not None:
                await session.on_frame(message["bytes"])
            elif message.get("text") is not None:
                await session.on_text(message["text"])

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ready",
                "backend": self.backend.description,
                "variant": self.backend.variant.name,
                "connections": len(self.sessions),
                "max_connections": self.limits.max_connections,
            }
        )


def create_app(backend: Backend, limits: Limits | None = None, access: Access | None = None) -> Starlette:
    """The page, /ws and /health for a backend (EngineBackend or CogBackend, closed when the app stops)."""
    realtime = Realtime(backend, limits or Limits(), access or Access())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await backend.close()

    app = Starlette(
        routes=[
            Route("/health", realtime.health),
            WebSocketRoute("/ws", realtime.serve),
            Mount("/", StaticFiles(directory=STATIC, html=True)),
        ],
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=realtime.access.allowed_hosts),
            Middleware(PagePolicy),
        ],
        lifespan=lifespan,
    )
    app.state.sessions = realtime.sessions
    return app


async def _refuse(websocket: WebSocket, field: str, message: str, code: int) -> None:
    """Accepted only to say why, then closed: the page shows the reason."""
    await websocket.accept()
    await websocket.send_json({"type": "error", "field": field, "message": message, "input": None})
    await websocket.close(code)


async def _close(websocket: WebSocket) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(IDLE)
