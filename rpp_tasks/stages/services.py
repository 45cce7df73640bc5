"""HTTP calls to astronomical services with a timeout, bounded retries and a circuit breaker.

Timeouts, connection refused and HTTP 5xx are retried with exponential backoff; HTTP 4xx, malformed
replies and name-resolution failures (an offline machine) are not. A per-process circuit breaker
stops asking a host that just failed, so an offline night costs milliseconds per frame, not
timeouts. Every call ends as a ServiceStatus; the catalogue adapter is rpp_tasks.stages.catalogs.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ServiceStatus", "ServiceError", "ServiceClient", "reset_circuit_breaker"]


@dataclass(frozen=True)
class ServiceStatus:
    """Outcome of one service call: ``status`` is ``ok``, ``cached``, ``empty``, ``skipped`` or
    ``failed``."""

    service: str
    status: str
    reason: str | None = None
    n_rows: int = 0
    attempts: int = 0
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "service": self.service,
            "status": self.status,
            "reason": self.reason,
            "n_rows": self.n_rows,
            "attempts": self.attempts,
            "wall_s": round(self.wall_s, 4),
        }


class ServiceError(Exception):
    """A service call failed; ``kind`` is ``timeout``, ``refused``, ``unreachable``, ``http``,
    ``malformed``."""

    def __init__(self, kind: str, message: str, *, circuit_open: bool = False):
        super().__init__(message)
        self.kind = kind
        #: True when the host was not asked at all because it failed moments ago: the failure was
        #: already logged as a warning once, so callers log this one at INFO (no warning per frame).
        self.circuit_open = circuit_open


# =============================================================================== HTTP client
_BREAKER: dict[str, float] = {}
_BREAKER_LOCK = threading.Lock()


def _host(url: str) -> str:
    m = re.match(r"^\w+://([^/]+)", url)
    return m.group(1) if m else url


class ServiceClient:
    """HTTP GET/POST with a timeout, bounded retries with exponential backoff, and a circuit
    breaker.

    Parameters
    ----------
    timeout_s : float
        Connect and read timeout of each attempt.
    max_retries : int
        Retries after the first attempt for timeouts, refused connections and HTTP 5xx.
    backoff_s : float
        Sleep before retry ``k`` is ``backoff_s * 2**k``.
    breaker_s : float
        After a failure that exhausted its retries, the host is not asked again for this long
        (in this process); 0 disables the breaker.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        breaker_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be > 0, max_retries and backoff_s >= 0")
        self.timeout_s, self.max_retries, self.backoff_s, self.breaker_s = (
            timeout_s,
            max_retries,
            backoff_s,
            breaker_s,
        )
        self._sleep = sleep

    def request(
        self,
        url: str,
        *,
        params: dict | None = None,
        data: dict | None = None,
        json_body: dict | None = None,
        headers: dict | None = None,
    ) -> tuple[bytes, int]:
        """Return ``(content, attempts)``; raise `ServiceError` when every attempt failed."""
        import requests

        host = _host(url)
        if self.breaker_s > 0:
            with _BREAKER_LOCK:
                until = _BREAKER.get(host, 0.0)
            if until > time.monotonic():
                raise ServiceError(
                    "unreachable",
                    f"{host} failed moments ago (circuit open), not asked again",
                    circuit_open=True,
                )
        last: ServiceError | None = None
        attempts = 0
        for k in range(self.max_retries + 1):
            if k:
                self._sleep(self.backoff_s * 2 ** (k - 1))
            attempts += 1
            try:
                if data is None and json_body is None:
                    r = requests.get(url, params=params, headers=headers, timeout=self.timeout_s)
                else:
                    r = requests.post(
                        url,
                        params=params,
                        data=data,
                        json=json_body,
                        headers=headers,
                        timeout=self.timeout_s,
                    )
            except requests.exceptions.Timeout as exc:
                last = ServiceError(
                    "timeout", f"timeout after {self.timeout_s:g} s ({type(exc).__name__})"
                )
                continue
            except requests.exceptions.ConnectionError as exc:
                text = str(exc)
                if (
                    "NameResolution" in text
                    or "Name or service not known" in text
                    or "getaddrinfo" in text
                ):
                    last = ServiceError(
                        "unreachable", f"name resolution failed for {host} (offline?)"
                    )
                    break  # an offline machine: retrying cannot help
                last = ServiceError("refused", f"connection failed: {' '.join(text.split())[:160]}")
                continue
            except requests.exceptions.RequestException as exc:
                last = ServiceError("http", f"{type(exc).__name__}: {exc}"[:200])
                break
            if r.status_code >= 500:
                last = ServiceError("http", f"HTTP {r.status_code}")
                continue
            if r.status_code >= 400:
                raise ServiceError("http", f"HTTP {r.status_code}: {r.text[:160]!r}")
            with _BREAKER_LOCK:
                _BREAKER.pop(host, None)
            return r.content, attempts
        if self.breaker_s > 0:
            with _BREAKER_LOCK:
                _BREAKER[host] = time.monotonic() + self.breaker_s
        assert last is not None
        last.attempts = attempts  # type: ignore[attr-defined]
        raise last


def reset_circuit_breaker() -> None:
    """Forget every failed host (tests, or a long-running process after the network came back)."""
    with _BREAKER_LOCK:
        _BREAKER.clear()
