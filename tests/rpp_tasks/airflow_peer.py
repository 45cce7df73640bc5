"""A loopback peer speaking the Airflow 3 REST API shape (``POST /auth/token``, ``/api/v2/...``):
what the session watcher and ``rpp up`` talk to in the tests (no Airflow needed)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER, PASSWORD = "rpp", "s3cret-pw"
FITS_BLOCK = b"SIMPLE  =                    T" + b" " * 50 + b"\0" * 2800  # 2880 bytes


def wait_for(cond, timeout=10.0, step=0.02):
    """Poll ``cond`` until it is true or ``timeout`` seconds have passed; its last value."""
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


class FakeAirflow:
    """Just enough of the Airflow 3 API server: JWT login, trigger (409 on a repeat), unpause,
    get run. ``fail_next`` answers 503 to the next N trigger requests; a run's state is
    ``states[(dag_id, run_id)]``, else ``run_state`` (``"queued"``: a scheduler that never
    starts anything)."""

    def __init__(self, port=0):
        self.runs = {}  # (dag_id, run_id) -> conf
        self.states = {}  # (dag_id, run_id) -> state
        self.run_state = "queued"
        self.state_requests = []  # run ids whose state was asked
        self.posts = []  # (time, dag_id, run_id, status)
        self.token_requests = 0
        self.valid_tokens = set()
        self.fail_next = 0
        self.paused = {}
        self.pools = {}  # name -> {"slots", "description"}
        self.healthy = True
        self.reject_as_invalid_jwt = False  # answer 403 "Invalid JWT token" to stale tokens
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, doc):
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"null")

            def _authorized(self):
                auth = self.headers.get("Authorization", "")
                with fake.lock:
                    return auth.startswith("Bearer ") and auth[7:] in fake.valid_tokens

            def _refuse(self, detail):
                if fake.reject_as_invalid_jwt:
                    return self._send(403, {"detail": "Invalid JWT token"})
                return self._send(401, {"detail": detail})

            def do_POST(self):
                parts = self.path.strip("/").split("/")
                if self.path == "/auth/token":
                    body = self._body()
                    with fake.lock:
                        fake.token_requests += 1
                        if body != {"username": USER, "password": PASSWORD}:
                            return self._send(401, {"detail": "Invalid credentials"})
                        token = f"jwt-{fake.token_requests}"
                        fake.valid_tokens.add(token)
                    return self._send(201, {"access_token": token})
                if parts == ["api", "v2", "pools"]:
                    if not self._authorized():
                        return self._refuse("Token Expired")
                    body = self._body()
                    with fake.lock:
                        if body["name"] in fake.pools:
                            return self._send(409, {"detail": "pool exists"})
                        fake.pools[body["name"]] = {
                            "slots": body["slots"],
                            "description": body["description"],
                        }
                    return self._send(201, body)
                if parts[:3] == ["api", "v2", "dags"] and parts[4:] == ["dagRuns"]:
                    dag_id = parts[3]
                    if not self._authorized():
                        return self._refuse("Token Expired")
                    body = self._body()
                    # TriggerDAGRunPostBody: logical_date is required (nullable), extra keys 422
                    if not (
                        isinstance(body, dict)
                        and "logical_date" in body
                        and set(body)
                        <= {
                            "dag_run_id",
                            "logical_date",
                            "conf",
                            "note",
                            "run_after",
                            "data_interval_start",
                            "data_interval_end",
                            "partition_key",
                        }
                    ):
                        return self._send(422, {"detail": "validation error"})
                    run_id = body["dag_run_id"]
                    with fake.lock:
                        if fake.fail_next > 0:
                            fake.fail_next -= 1
                            fake.posts.append((time.time(), dag_id, run_id, 503))
                            return self._send(503, {"detail": "Service Unavailable"})
                        if (dag_id, run_id) in fake.runs:
                            fake.posts.append((time.time(), dag_id, run_id, 409))
                            return self._send(
                                409, {"detail": {"reason": "Unique constraint violation"}}
                            )
                        fake.runs[(dag_id, run_id)] = body["conf"]
                        fake.posts.append((time.time(), dag_id, run_id, 200))
                    return self._send(
                        200,
                        {
                            "dag_run_id": run_id,
                            "dag_id": dag_id,
                            "state": "queued",
                            "conf": body["conf"],
                        },
                    )
                return self._send(404, {"detail": "Not Found"})

            def do_PATCH(self):
                parts = self.path.strip("/").split("/")
                if not self._authorized():
                    return self._refuse("Not authenticated")
                body = self._body()
                if parts[:3] == ["api", "v2", "pools"]:
                    if body.get("slots", 0) < 0:
                        return self._send(400, {"detail": "slots must be >= 0"})
                    with fake.lock:
                        fake.pools[parts[3]] = {
                            "slots": body["slots"],
                            "description": body["description"],
                        }
                    return self._send(200, body)
                with fake.lock:
                    fake.paused[parts[3]] = body["is_paused"]
                return self._send(200, {"dag_id": parts[3], "is_paused": body["is_paused"]})

            def do_GET(self):
                parts = self.path.strip("/").split("/")
                if parts == ["api", "v2", "monitor", "health"]:  # no login needed
                    status = "healthy" if fake.healthy else "unhealthy"
                    return self._send(
                        200,
                        {
                            "metadatabase": {"status": "healthy"},
                            "scheduler": {"status": status},
                        },
                    )
                if not self._authorized():
                    return self._refuse("Not authenticated")
                if len(parts) == 4 and parts[:3] == ["api", "v2", "dags"]:
                    known = any(d == parts[3] for d, _ in fake.runs) or parts[3] in fake.paused
                    return self._send(200 if known else 404, {"dag_id": parts[3]})
                if len(parts) == 6 and (parts[3], parts[5]) in fake.runs:
                    with fake.lock:
                        fake.state_requests.append(parts[5])
                        state = fake.states.get((parts[3], parts[5]), fake.run_state)
                    return self._send(200, {"dag_run_id": parts[5], "state": state})
                if parts[6:] == ["taskInstances"] and (parts[3], parts[5]) in fake.runs:
                    tis = [{"task_id": "open_session", "state": "success"}]
                    return self._send(200, {"task_instances": tis, "total_entries": 1})
                return self._send(404, {"detail": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def created(self, dag_id=None):
        with self.lock:
            return [p for p in self.posts if p[3] == 200 and (dag_id is None or p[1] == dag_id)]

    def posts_for(self, run_id):
        with self.lock:
            return [p for p in self.posts if p[2] == run_id]

    def expire_tokens(self):
        with self.lock:
            self.valid_tokens.clear()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
