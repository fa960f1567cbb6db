"""Route tables: each service lists (method, path pattern, handler) entries; the first entry
whose pattern matches the whole path and whose method is the request's (or "*") answers it."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from localdev.amlemu.common import HttpError
from localdev.emuhttp import Reply as Reply

ANY = "*"
"""A route's method that matches every method (the entry after a resource's own methods)."""


@dataclass(frozen=True)
class Request:
    """One request as a handler sees it; `params` are the route pattern's named groups."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    authorization: str | None
    host: str | None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        """This emulator's URL as the client reached it."""
        return f"http://{self.host}"

    def authorize(self, key: str) -> None:
        """Answer 401 unless the request carries `Authorization: Bearer <key>`."""
        if self.authorization != f"Bearer {key}":
            raise HttpError(401, "Unauthorized", "Invalid API key")


Handler = Callable[[Request], Reply]


class Route(NamedTuple):
    """One entry of a route table."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler


def route(method: str, pattern: str, handler: Handler) -> Route:
    """A route table entry; `pattern` must match the whole path."""
    return Route(method, re.compile(pattern), handler)


def not_allowed() -> HttpError:
    """The 405 for a method a resource does not have."""
    return HttpError(405, "MethodNotAllowed")


def dispatch(table: Sequence[Route], request: Request) -> Reply:
    """The reply of the first matching entry; 404 naming the path when none matches."""
    for method, pattern, handler in table:
        found = pattern.fullmatch(request.path)
        if found is not None and method in (request.method, ANY):
            params = {k: v for k, v in found.groupdict().items() if v is not None}
            return handler(replace(request, params=params))
    raise HttpError(404, "NotFound", request.path)
