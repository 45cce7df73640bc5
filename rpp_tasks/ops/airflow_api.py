"""The one client of the Airflow 3 REST API (``/api/v2``) that code outside Airflow uses.

The session watcher (`rpp_tasks.ops.watch`) triggers a session's DAG run and unpauses DAGs with
it; ``rpp up`` (`rpp_tasks.ops.up`) waits for the API to be healthy, creates the pool, waits for a
DAG to be parsed and follows the demo run. Both get:

* **one authentication path** -- a static ``token`` (env ``RPP_AIRFLOW_TOKEN``), else a JWT from
  ``POST /auth/token`` ``{"username", "password"}`` (the simple auth manager of
  ``airflow standalone`` and the FAB auth manager both serve it), else anonymous
  ``GET /auth/token`` (simple auth manager with ``simple_auth_manager_all_admins``). The token
  is fetched once, cached, and fetched again when the API answers 401 (expired) or 403
  ``Invalid JWT token`` (the API server was restarted with a new secret). The password and the
  token are never logged.
* **one retry policy** -- a request is repeated once, with a fresh token, after such a 401/403;
  nothing else is retried here. Network and HTTP errors go back to the caller, which owns the
  pace: the watcher queues a trigger with exponential backoff, ``rpp up`` polls until a timeout.
* **one error vocabulary** -- `trigger` and `unpause` never raise: they return a `TriggerOutcome`
  (``created``, ``exists`` = HTTP 409, which counts as done, or ``failed``; the HTTP status,
  ``None`` when the server could not be reached). Every other call raises `AirflowApiError`
  (same ``status`` convention, the network reason in plain words), never a ``requests`` error.

This module never imports Airflow; it speaks HTTP with ``requests``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass

from rpp_tasks.exceptions import RppError

__all__ = ["AirflowApiError", "AirflowClient", "TriggerOutcome"]

log = logging.getLogger(__name__)

# What an HTTP status of a trigger request means for the operator.
_TRIGGER_HINTS = {
    404: "DAG not found (not parsed yet, or wrong dag_id)",
    403: "forbidden: the user may not trigger this DAG",
    400: "rejected by the API",
    422: "request body rejected",
}


class AirflowApiError(RppError):
    """An Airflow REST call that did not succeed.

    ``status`` is the HTTP status, ``None`` when the API server could not be reached.
    """

    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TriggerOutcome:
    """Result of one trigger (or unpause) attempt.

    ``result`` is ``"created"`` (the run was created), ``"exists"`` (409: a run with this id
    already exists, which counts as done) or ``"failed"`` (retry later); ``status`` is the HTTP
    status, ``None`` when the server could not be reached.
    """

    result: str
    status: int | None
    message: str

    @property
    def delivered(self) -> bool:
        return self.result in ("created", "exists")

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return asdict(self)


class AirflowClient:
    """
    Airflow 3 REST API client (see the module docstring for auth, retries and errors).

    Parameters
    ----------
    base_url : str
        API server URL, e.g. ``http://localhost:8080`` (a trailing ``/api/v2`` is accepted).
    user, password : str, optional
    timeout : float, optional
        Seconds per HTTP request.
    token : str, optional
        A ready JWT; no login is attempted unless it is rejected and credentials are given.
    """

    def __init__(self, base_url, user=None, password=None, timeout=10.0, *, token=None):
        import requests  # only the processes that talk to Airflow need it

        base = str(base_url).rstrip("/")
        if base.endswith("/api/v2"):
            base = base[: -len("/api/v2")]
        self.base_url = base
        self.user = user
        self._password = password
        self.timeout = float(timeout)
        self._token = token
        self._static_token = token
        self._lock = threading.Lock()
        self._http = requests.Session()
        self._requests = requests
        self.n_token_fetches = 0

    def __repr__(self):
        return f"AirflowClient({self.base_url!r}, user={self.user!r})"

    @classmethod
    def from_env(cls, base_url=None, *, timeout=10.0) -> AirflowClient:
        """Build from ``RPP_AIRFLOW_API_URL`` (default ``http://localhost:8080``),
        ``RPP_AIRFLOW_USER``, ``RPP_AIRFLOW_PASSWORD`` and ``RPP_AIRFLOW_TOKEN``."""
        return cls(
            base_url or os.environ.get("RPP_AIRFLOW_API_URL", "http://localhost:8080"),
            os.environ.get("RPP_AIRFLOW_USER"),
            os.environ.get("RPP_AIRFLOW_PASSWORD"),
            timeout,
            token=os.environ.get("RPP_AIRFLOW_TOKEN") or None,
        )

    # -- auth --------------------------------------------------------------------------------

    def _fetch_token(self) -> str | None:
        url = f"{self.base_url}/auth/token"
        self.n_token_fetches += 1
        if self.user and self._password is not None:
            resp = self._http.post(
                url, json={"username": self.user, "password": self._password}, timeout=self.timeout
            )
        else:
            resp = self._http.get(url, timeout=self.timeout)
        if resp.status_code in (200, 201):
            try:
                token = resp.json()["access_token"]
            except (ValueError, KeyError, TypeError):
                raise AirflowApiError(
                    resp.status_code, "token endpoint answered without access_token"
                ) from None
            log.info("obtained an API token from %s for user %s", url, self.user or "(none)")
            return token
        if resp.status_code >= 500:
            raise AirflowApiError(
                resp.status_code, f"token endpoint {url} unavailable (HTTP {resp.status_code})"
            )
        who = f"user {self.user!r}" if self.user else "anonymous access"
        raise AirflowApiError(
            resp.status_code,
            f"login to {url} failed for {who} "
            f"(HTTP {resp.status_code}); check RPP_AIRFLOW_USER/RPP_AIRFLOW_PASSWORD",
        )

    def _headers(self, refresh=False) -> dict:
        with self._lock:
            if refresh or self._token is None:
                if refresh and self._static_token and not self.user:
                    raise AirflowApiError(401, "the API rejected the configured RPP_AIRFLOW_TOKEN")
                self._token = self._fetch_token()
            token = self._token
        return {"Authorization": f"Bearer {token}"} if token else {}

    # -- transport ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict | None = None):
        """One authenticated call of ``/api/v2{path}``; the ``requests`` response, any status.

        Raises
        ------
        AirflowApiError
            The server could not be reached (``status=None``) or the login failed.
        """
        url = f"{self.base_url}/api/v2{path}"
        try:
            resp = self._http.request(
                method, url, json=body, headers=self._headers(), timeout=self.timeout
            )
            if resp.status_code == 401 or (
                resp.status_code == 403 and "invalid jwt" in resp.text.lower()
            ):
                log.info(
                    "API answered %s to %s %s: fetching a new token",
                    resp.status_code,
                    method,
                    path,
                )
                resp = self._http.request(
                    method,
                    url,
                    json=body,
                    headers=self._headers(refresh=True),
                    timeout=self.timeout,
                )
        except self._requests.RequestException as exc:
            raise AirflowApiError(
                None, f"API unreachable at {self.base_url}: {_network_reason(exc)}"
            ) from None
        return resp

    # -- calls that never raise --------------------------------------------------------------

    def trigger(
        self, dag_id: str, run_id: str, conf: dict, *, note: str | None = None
    ) -> TriggerOutcome:
        """
        Create the DAG run ``run_id`` (``POST /api/v2/dags/{dag_id}/dagRuns``).

        Returns
        -------
        outcome : `TriggerOutcome`
            ``created`` on 200/201, ``exists`` on 409, ``failed`` otherwise (never raises for
            HTTP or network errors).
        """
        body = {"dag_run_id": run_id, "logical_date": None, "conf": dict(conf)}
        if note:
            body["note"] = note
        try:
            resp = self.request("POST", f"/dags/{dag_id}/dagRuns", body)
        except AirflowApiError as exc:
            return TriggerOutcome("failed", exc.status, str(exc))
        if resp.status_code in (200, 201):
            return TriggerOutcome("created", resp.status_code, f"run {run_id} created")
        if resp.status_code == 409:
            return TriggerOutcome("exists", 409, f"run {run_id} already exists")
        hint = _TRIGGER_HINTS.get(resp.status_code, "API error")
        return TriggerOutcome(
            "failed", resp.status_code, f"{hint} (HTTP {resp.status_code}): {_short(resp.text)}"
        )

    def unpause(self, dag_id: str) -> TriggerOutcome:
        """Unpause a DAG (``PATCH /api/v2/dags/{dag_id}`` ``{"is_paused": false}``).

        A run triggered on a paused DAG is created but waits until the DAG is unpaused.
        """
        try:
            resp = self.request("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        except AirflowApiError as exc:
            return TriggerOutcome("failed", exc.status, str(exc))
        if resp.status_code == 200:
            return TriggerOutcome("created", 200, f"DAG {dag_id} unpaused")
        return TriggerOutcome("failed", resp.status_code, _short(resp.text))

    def healthy(self) -> bool:
        """The metadata DB and the scheduler report healthy (``GET /api/v2/monitor/health``,
        no login needed); False while the API server is down or starting."""
        try:
            r = self._http.get(f"{self.base_url}/api/v2/monitor/health", timeout=self.timeout)
            if r.status_code != 200:
                return False
            h = r.json()
        except (self._requests.RequestException, ValueError):
            return False
        return all(
            (h.get(k) or {}).get("status") == "healthy" for k in ("metadatabase", "scheduler")
        )

    def run_exists(self, dag_id: str, run_id: str) -> bool | None:
        """Whether the run exists (``GET .../dagRuns/{run_id}``); ``None`` if unknown."""
        try:
            resp = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        except AirflowApiError:
            return None
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        return None

    # -- calls that raise AirflowApiError ----------------------------------------------------

    def dag_registered(self, dag_id: str) -> bool:
        """The DAG has been parsed (``GET /api/v2/dags/{dag_id}`` answers 200)."""
        return self.request("GET", f"/dags/{dag_id}").status_code == 200

    def ensure_pool(self, name: str, slots: int, description: str) -> None:
        """Create the pool, or set its slots and description when it exists."""
        r = self.request(
            "POST", "/pools", {"name": name, "slots": slots, "description": description}
        )
        if r.status_code == 409:
            r = self.request(
                "PATCH",
                f"/pools/{name}",
                {
                    "name": name,
                    "slots": slots,
                    "description": description,
                    "include_deferred": False,
                },
            )
        if r.status_code not in (200, 201):
            raise AirflowApiError(
                r.status_code, f"cannot create pool {name}: HTTP {r.status_code} {r.text[:300]}"
            )

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        """State of a DAG run (``queued``, ``running``, ``success``, ``failed``); None if absent."""
        r = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        return r.json().get("state") if r.status_code == 200 else None

    def task_states(self, dag_id: str, run_id: str) -> dict:
        """``task_id -> state`` of a DAG run (empty when the run is not there)."""
        r = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        if r.status_code != 200:
            return {}
        return {t["task_id"]: t.get("state") for t in r.json().get("task_instances", [])}

    def close(self):
        self._http.close()


def _network_reason(exc) -> str:
    text = str(exc).lower()
    for needle, words in (
        ("refused", "connection refused"),
        ("timed out", "timed out"),
        ("name or service not known", "unknown host"),
        ("temporary failure in name resolution", "DNS failure"),
        ("reset by peer", "connection reset"),
    ):
        if needle in text:
            return f"{type(exc).__name__} ({words})"
    return f"{type(exc).__name__}: {_short(str(exc), 160)}"


def _short(text, n=300):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
