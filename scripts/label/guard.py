# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Request guard for MONAI Label 0.8.5: client-chosen ids never become paths outside the datastore.

MONAI Label builds file names from what a client sends: ``PUT /datastore/image?image=ID`` writes
``<studies>/<ID><ext>`` (``<ext>`` from the uploaded file name; without ``image`` the id is the upload's file
name), ``PUT /datastore/label?image=ID&tag=TAG`` writes ``<studies>/labels/<TAG>/<ID><ext>``, ``DELETE`` removes
such paths, ``session_id`` names a folder that is read or removed, and the ``params`` JSON of ``/infer``
(``label_tag``, ``image``) and the JSON body of ``/train`` (``model_filename``) are merged into requests that
read or write files. None of it is checked, so ``../``, an absolute path or a backslash reaches ``os.path.join``.

:class:`LabelGuardMiddleware` is a pure ASGI middleware that refuses such requests with **422** before
MONAI Label reads a byte of the body, so nothing is written:

* query parameters :data:`GUARDED_QUERY_PARAMS` (``image``, ``label``, ``id``, ``tag``, ``session_id``), as
  starlette decodes them (``%2e%2e%2f`` is ``../``), must pass :func:`validate_id`;
* path segments (``/session/{session_id}``, ``/model/{model}``, ...) must not be ``.``/``..`` nor hold a
  backslash or a control character (:func:`validate_path`);
* multipart uploads are spooled (memory, then a temporary file) and parsed with python-multipart, the parser
  starlette uses: every file name must have a usable last component (:func:`validate_upload_filename`), and on
  an image upload without ``image`` that component becomes the id, so it must pass :func:`validate_id`; a
  ``params`` field, a urlencoded ``params`` or a JSON body must not carry a bad :data:`GUARDED_PARAM_KEYS` value
  (:func:`validate_params`). The body is then replayed to MONAI Label unchanged.

Two browser-facing checks sit beside it (a page the user visits can send requests to a loopback server):

* ``allowed_hosts``: a request whose ``Host`` is not listed gets **400** (DNS rebinding turns a hostile
  page into a same-origin one; the check keeps it out);
* ``Origin``: a state-changing request (not GET/HEAD/OPTIONS) that carries an ``Origin`` header other than the
  server's own or a listed one gets **403** (cross-site form posts need no CORS pre-flight).

:func:`install_guard` puts the middleware in front of a FastAPI/starlette app and replaces its CORS policy
(MONAI Label allows every origin, with credentials, when ``MONAI_LABEL_CORS_ORIGINS`` is empty) by one that
allows only the listed origins (none by default).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "GUARDED_QUERY_PARAMS",
    "GUARDED_PARAM_KEYS",
    "RESERVED_IDS",
    "MAX_ID_BYTES",
    "LOOPBACK_HOSTS",
    "RequestRefused",
    "validate_id",
    "validate_path",
    "validate_upload_filename",
    "validate_params",
    "normalize_origin",
    "LabelGuardMiddleware",
    "install_guard",
]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: query parameters that MONAI Label 0.8.5 turns into file or folder names (datastore ids, label tags, sessions).
GUARDED_QUERY_PARAMS: frozenset[str] = frozenset({"image", "label", "id", "tag", "session_id"})
#: keys of the ``params`` JSON (infer, datastore uploads) and of JSON bodies (train, scoring, active learning)
#: that MONAI Label merges into requests that read or write files.
GUARDED_PARAM_KEYS: frozenset[str] = frozenset(
    {"image", "label", "id", "tag", "label_tag", "session_id", "model_filename"})
#: ids that would name the local datastore's own files (``datastore_v2.json``), compared case-insensitively.
RESERVED_IDS: frozenset[str] = frozenset({"datastore_v2"})
#: longest id accepted (UTF-8 bytes): with its extension it must still fit in a file name (255 bytes).
MAX_ID_BYTES = 200
#: host names of the loopback interface, the default ``allowed_hosts`` of a server bound to it.
LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_SPOOL_MEMORY = 8 * 1024 * 1024
_CHUNK = 64 * 1024
#: largest urlencoded or JSON body inspected (MONAI Label's are a few hundred bytes); larger ones get 413.
MAX_PARAMS_BODY = 16 * 1024 * 1024
#: largest text field (``params``) of a multipart body that is inspected.
MAX_TEXT_FIELD = 1024 * 1024


class RequestRefused(ValueError):
    """A request the guard refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def _control_chars(value: str) -> list[str]:
    return [repr(c) for c in value if unicodedata.category(c) == "Cc"]


def validate_id(value: str, what: str = "id") -> str:
    """Check that a client-chosen id can only name a file inside the datastore folder.

    Args:
        value: the id (a datastore image id, a label tag, a session id).
        what: how to call it in the error message, e.g. ``"query parameter 'image'"``.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: the id is empty, too long, holds a path separator (``/`` or ``\\``), ``..``, a control
            character, starts with ``.`` or a drive letter (``C:``), or is a reserved name.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}.")
    hint = "use a plain name such as 'case_001'"
    if not value:
        raise ValueError(f"{what} must not be empty; {hint}.")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise ValueError(f"{what} is longer than {MAX_ID_BYTES} bytes; {hint}.")
    bad = _control_chars(value)
    if bad:
        raise ValueError(f"{what} {value!r} holds control characters {bad}; {hint}.")
    if "/" in value or "\\" in value:
        raise ValueError(f"{what} {value!r} holds a path separator ('/' or '\\'); {hint}.")
    if ".." in value:
        raise ValueError(f"{what} {value!r} holds '..'; {hint}.")
    if value.startswith("."):
        raise ValueError(f"{what} {value!r} starts with '.' (hidden or datastore-internal file); {hint}.")
    if _DRIVE.match(value):
        raise ValueError(f"{what} {value!r} starts with a drive letter; {hint}.")
    if value.casefold() in RESERVED_IDS:
        raise ValueError(f"{what} {value!r} is reserved for the datastore's own files; {hint}.")
    return value


def validate_path(path: str) -> str:
    """Check the decoded URL path: no ``.``/``..`` segment, no backslash, no control character.

    Raises:
        ValueError: the path holds such a segment (MONAI Label joins path parameters such as ``session_id``
            to folders).
    """
    for segment in path.split("/"):
        if segment in (".", ".."):
            raise ValueError(f"URL path {path!r} holds a {segment!r} segment.")
        if "\\" in segment or _control_chars(segment):
            raise ValueError(f"URL path {path!r} holds a backslash or a control character.")
    return path


def validate_upload_filename(filename: str, defines_id: bool = False) -> str:
    """Check an uploaded file's name as MONAI Label uses it.

    MONAI Label's own client sends the whole local path as the file name, so ``/`` is allowed; the server keeps
    the last component (for the extension, and as the id of an image uploaded without ``?image=``).

    Args:
        filename: the ``filename`` of the multipart part.
        defines_id: the last component becomes a datastore id (image upload without an ``image`` parameter).

    Raises:
        ValueError: the name holds a control character, its last component is empty, ``.`` or ``..``, or
            (``defines_id``) that component is not a valid id (see :func:`validate_id`).
    """
    bad = _control_chars(filename)
    if bad:
        raise ValueError(f"uploaded file name {filename!r} holds control characters {bad}.")
    name = filename.rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise ValueError(f"uploaded file name {filename!r} does not end with a file name.")
    if defines_id:
        validate_id(name, f"uploaded file name {filename!r} (the image id when no 'image' is given)")
    return filename


def validate_params(params: Any, what: str = "params") -> None:
    """Check the keys of a request's JSON parameters that MONAI Label uses as ids or file names.

    Args:
        params: the decoded JSON (only a mapping is checked; MONAI Label merges its top level into requests).
        what: where the JSON came from, for the error message.

    Raises:
        ValueError: a :data:`GUARDED_PARAM_KEYS` value (a string, or a list of strings) is not a valid id.
    """
    if not isinstance(params, dict):
        return
    for key in sorted(GUARDED_PARAM_KEYS & params.keys()):
        value = params[key]
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str):
                validate_id(v, f"{what} key {key!r}")


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` of a browser origin, lower case, without a trailing slash.

    Raises:
        ValueError: not an http(s) origin (a path, a query or ``*`` is not an origin).
    """
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError(f"{origin!r} is not an origin; list origins as scheme://host[:port], "
                         "e.g. http://localhost:3000 (a wildcard is not accepted).")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_image_upload(method: str, path: str) -> bool:
    """``PUT /datastore/`` and ``PUT /datastore/image``: the upload's file name is the id without ``image``."""
    return method == "PUT" and path.rstrip("/").endswith(("/datastore", "/datastore/image"))


class _MultipartInspector:
    """Feeds a multipart body to python-multipart's parser and checks part names as they stream past."""

    def __init__(self, boundary: bytes, image_upload_without_id: bool) -> None:
        from python_multipart.multipart import MultipartParser

        self.image_upload_without_id = image_upload_without_id
        self.error: ValueError | None = None
        self._field, self._value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._text_name: str | None = None
        self._text = bytearray()
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._grow("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._grow("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })

    def _grow(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._text_name, self._text = {}, None, bytearray()

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = _decode(options.get(b"name", b""))
        if b"filename" in options:
            self._check(validate_upload_filename, _decode(options[b"filename"]),
                        self.image_upload_without_id and name == "file")
        elif name == "params" or name in GUARDED_QUERY_PARAMS:
            self._text_name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._text_name is not None and len(self._text) <= MAX_TEXT_FIELD:
            self._text += data[start:end]

    def _part_end(self) -> None:
        if self._text_name is None:
            return
        if len(self._text) > MAX_TEXT_FIELD:
            self._fail(ValueError(f"form field {self._text_name!r} is longer than {MAX_TEXT_FIELD} bytes."))
        elif self._text_name == "params":
            self._check(_check_params_text, _decode(bytes(self._text)), "form field 'params'")
        else:
            self._check(validate_id, _decode(bytes(self._text)), f"form field {self._text_name!r}")

    def _check(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except ValueError as e:
            self._fail(e)

    def _fail(self, error: ValueError) -> None:
        if self.error is None:
            self.error = error

    def write(self, data: bytes) -> None:
        if self.error is None:
            try:
                self._parser.write(data)
            except Exception as e:  # python-multipart raises its own errors on malformed bodies
                self._fail(RequestRefused(f"malformed multipart body: {e}", 400))

    def finalize(self) -> None:
        if self.error is None:
            try:
                self._parser.finalize()
            except Exception as e:
                self._fail(RequestRefused(f"malformed multipart body: {e}", 400))


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _check_params_text(text: str, what: str) -> None:
    if not text.strip():
        return
    try:
        params = json.loads(text)
    except ValueError:
        return  # not JSON: MONAI Label answers that itself, nothing is merged
    validate_params(params, what)


def _body_kind(scope: Scope) -> tuple[str, bytes] | None:
    """How the body reaches MONAI Label's parameters: ("multipart", boundary), ("form", b""), ("json", b"")."""
    from python_multipart.multipart import parse_options_header

    ctype, options = parse_options_header(_header(scope, b"content-type") or "")
    if ctype == b"multipart/form-data":
        return "multipart", options.get(b"boundary", b"")
    if ctype == b"application/x-www-form-urlencoded":
        return "form", b""
    main, _, sub = ctype.partition(b"/")
    if not ctype or (main == b"application" and (sub == b"json" or sub.endswith(b"+json"))):
        return "json", b""  # FastAPI parses a body without content type as JSON too
    return None


class LabelGuardMiddleware:
    """ASGI middleware refusing requests whose ids would leave the datastore (see the module docstring).

    Args:
        app: the ASGI app to protect (MONAI Label's FastAPI app).
        allowed_hosts: host names accepted in the ``Host`` header (port ignored); ``None`` or ``"*"`` in it: any.
        allowed_origins: origins (besides the server's own) whose state-changing requests are accepted.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
                 allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        hosts = None if allowed_hosts is None else {_host_name(h) for h in allowed_hosts}
        self.allowed_hosts = None if hosts is None or "*" in hosts else frozenset(hosts)
        self.allowed_origins = frozenset(normalize_origin(o) for o in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self.check_request(scope)
        except ValueError as e:
            await self._refuse(scope, send, e)
            return
        kind = _body_kind(scope)
        if kind is None:
            await self.app(scope, receive, send)
            return
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)
        try:
            try:
                await self._inspect_body(scope, receive, kind, spool)
            except ValueError as e:
                await self._refuse(scope, send, e)
                return
            spool.seek(0)
            await self.app(scope, self._replay(spool, receive), send)
        finally:
            spool.close()

    def check_request(self, scope: Scope) -> None:
        """Host, Origin, URL path and query checks (no body needed).

        Raises:
            RequestRefused: with the status to answer.
        """
        if self.allowed_hosts is not None:
            host = _header(scope, b"host")
            if host is None or _host_name(host) not in self.allowed_hosts:
                raise RequestRefused(f"Host {host!r} is not served here (allowed: {sorted(self.allowed_hosts)}).",
                                     400)
        method = scope["method"].upper()
        origin = _header(scope, b"origin")
        if origin is not None and method not in _SAFE_METHODS:
            own = f"{scope.get('scheme', 'http')}://{(_header(scope, b'host') or '').lower()}"
            try:
                origin_n = normalize_origin(origin)
            except ValueError:
                origin_n = origin  # e.g. "null" from a sandboxed page
            if origin_n != own and origin_n not in self.allowed_origins:
                raise RequestRefused(f"cross-origin {method} from {origin!r} refused; list trusted origins with "
                                     "--cors_origins.", 403)
        try:
            validate_path(scope["path"])
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            for key, value in query:
                if key in GUARDED_QUERY_PARAMS:
                    validate_id(value, f"query parameter {key!r}")
        except ValueError as e:
            raise RequestRefused(str(e)) from e

    async def _inspect_body(self, scope: Scope, receive: Receive, kind: tuple[str, bytes], spool: Any) -> None:
        """Read the whole body into ``spool`` and check it before the app sees any of it."""
        name, boundary = kind
        inspector = None
        if name == "multipart":
            if not boundary:
                raise RequestRefused("multipart body without a boundary.", 400)
            no_id = not any(k == "image" for k, _ in parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            inspector = _MultipartInspector(boundary, _is_image_upload(scope["method"].upper(), scope["path"])
                                            and no_id)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRefused("client disconnected before the body was complete.", 400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if inspector is None and size > MAX_PARAMS_BODY:
                raise RequestRefused(f"request body larger than {MAX_PARAMS_BODY} bytes.", 413)
            if chunk:
                spool.write(chunk)
                if inspector is not None:
                    inspector.write(chunk)
            if not message.get("more_body", False):
                break
        if inspector is not None:
            inspector.finalize()
            if inspector.error is not None:
                raise inspector.error
        elif size:
            spool.seek(0)
            raw = spool.read()
            if name == "form":
                fields = parse_qsl(_decode(raw), keep_blank_values=True)
                for key, value in fields:
                    if key == "params":
                        _check_params_text(value, "form field 'params'")
                    elif key in GUARDED_QUERY_PARAMS:
                        validate_id(value, f"form field {key!r}")
            else:
                _check_params_text(_decode(raw), "JSON body")

    @staticmethod
    def _replay(spool: Any, receive: Receive) -> Receive:
        """The spooled body as ``http.request`` messages, then the client's own ``receive`` (disconnect)."""
        pending, done = spool.read(_CHUNK), False

        async def replay() -> Message:
            nonlocal pending, done
            if done:
                return await receive()
            chunk, pending = pending, spool.read(_CHUNK)
            done = not pending
            return {"type": "http.request", "body": chunk, "more_body": not done}

        return replay

    @staticmethod
    async def _refuse(scope: Scope, send: Send, error: ValueError) -> None:
        status = error.status_code if isinstance(error, RequestRefused) else 422
        logger.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), error)
        body = json.dumps({"detail": str(error)}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def install_guard(app: Any, cors_origins: Sequence[str] = (), allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
                  ) -> Any:
    """Protect a FastAPI/starlette app (MONAI Label's ``monailabel.app.app``) before it serves its first request.

    Its CORS middleware (MONAI Label's allows every origin with credentials) is replaced by one allowing only
    ``cors_origins`` (none by default: same-origin pages need no CORS), and :class:`LabelGuardMiddleware` becomes
    the outermost middleware.

    Args:
        app: a starlette ``Starlette``/FastAPI app whose middleware stack is not built yet.
        cors_origins: browser origins (``scheme://host[:port]``) allowed to call the API.
        allowed_hosts: accepted ``Host`` names (see :class:`LabelGuardMiddleware`).

    Returns:
        ``app``, changed in place.

    Raises:
        ValueError: an origin is not ``scheme://host[:port]``.
        RuntimeError: the app has started already (starlette refuses new middleware then).
    """
    from starlette.middleware.cors import CORSMiddleware

    origins = [normalize_origin(o) for o in cors_origins]
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "PUT", "DELETE", "HEAD"], allow_headers=["*"])
    app.add_middleware(LabelGuardMiddleware, allowed_hosts=allowed_hosts, allowed_origins=origins)
    logger.info("MONAI Label guard installed: CORS origins %s, hosts %s", origins or "none",
                "any" if allowed_hosts is None else sorted(allowed_hosts))
    return app
