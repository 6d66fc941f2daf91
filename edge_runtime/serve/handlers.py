"""ServeError and the exception handlers that turn every failure into an OpenAI error body."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_runtime.errors import EdgeRuntimeError, NumericalError
from edge_runtime.serve.engine import Stopping
from edge_runtime.serve.schemas import error_body

ERROR_TYPES = {429: "rate_limit_error", 401: "authentication_error"}


class ServeError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}

    @classmethod
    def from_job_error(cls, e: Exception) -> ServeError:
        """A job's exception: Stopping a 503 (the server is going down), NumericalError the model's fault (500),
        EdgeRuntimeError the request's fault (400), anything else the server's (500, naming the exception so
        that the log and the client see the same thing)."""
        if isinstance(e, Stopping):
            return cls(503, str(e), "shutting_down", {"Retry-After": "5"})
        if isinstance(e, NumericalError):  # the served model is broken, whatever the request
            return cls(500, str(e), "model_error")
        if isinstance(e, EdgeRuntimeError):
            return cls(400, str(e))
        return cls(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    def body(self) -> dict:
        type_ = "server_error" if self.status >= 500 else ERROR_TYPES.get(self.status, "invalid_request_error")
        return error_body(str(self), type_, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(_req, exc: ServeError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":  # loc is ("body", character offset), not a field
            at = next((p for p in first.get("loc", ()) if isinstance(p, int)), None)
            why = (first.get("ctx") or {}).get("error")
            msg = "the request body is not valid JSON" + (f" (at character {at})" if at is not None else "")
            return JSONResponse(error_body(msg + (f": {why}" if why else "")), 400)
        # a union's member tags ("function-after[...]", "list[...]") are pydantic's notation, not the request's
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and "[" in p))
        why = first.get("msg", "invalid request").removeprefix("Value error, ")
        msg = f"{where}: {why}" if where else why
        return JSONResponse(error_body(msg, param=where or None), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req, exc: Exception):  # whatever escaped a route: still an OpenAI error body
        return ServeError.from_job_error(exc).response()
