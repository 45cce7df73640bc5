"""Who may do what on the dashboard: Airflow's own users and roles decide.

Three levels, each including the one below:

* **viewer** browses and downloads: the user may read the observatory's DAG;
* **observer** also validates and withdraws: the user may edit that DAG (Airflow's ``User`` role and
  above; with a real auth manager, per DAG, so per observatory);
* **admin** also deletes a session's products: the user holds one of the admin roles (Airflow's
  ``admin`` role by default).

The Airflow side (which auth manager, how a user is read from the request) is the plugin's job; here
an `Actor` gets the user's role names and a callable asking the auth manager about DAG access.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

NONE, VIEWER, OBSERVER, ADMIN = 0, 1, 2, 3
LEVEL_NAMES = {NONE: "none", VIEWER: "viewer", OBSERVER: "observer", ADMIN: "admin"}
#: The level each action needs.
ACTIONS = {"browse": VIEWER, "download": VIEWER, "decide": OBSERVER, "delete": ADMIN}
DEFAULT_ADMIN_ROLES = ("admin",)


def role_names(user) -> tuple[str, ...]:
    """Role names of an auth manager's user: ``user.role`` (simple auth manager) and/or
    ``user.roles`` (FAB: role objects with ``.name``), lower-cased."""
    names = []
    role = getattr(user, "role", None)
    if role:
        names.append(str(role))
    for r in getattr(user, "roles", None) or ():
        names.append(str(getattr(r, "name", r)))
    return tuple(n.lower() for n in names)


@dataclass(frozen=True)
class Actor:
    """A logged-in user as the dashboard sees it.

    ``can(method, dag_id)`` answers the auth manager's ``is_authorized_dag`` for ``"GET"`` (read)
    and ``"PUT"`` (edit) on the DAG of an observatory (``dag_id`` None: any DAG).
    """

    name: str
    roles: tuple[str, ...] = ()
    can: Callable[[str, str | None], bool] = field(default=lambda method, dag_id: False)
    admin_roles: tuple[str, ...] = DEFAULT_ADMIN_ROLES

    def level(self, dag_id: str | None = None) -> int:
        if any(r in self.admin_roles for r in self.roles):
            return ADMIN
        if self.can("PUT", dag_id):
            return OBSERVER
        if self.can("GET", dag_id):
            return VIEWER
        return NONE

    def allowed(self, action: str, dag_id: str | None = None) -> bool:
        return self.level(dag_id) >= ACTIONS[action]

    def require(self, action: str, dag_id: str | None = None) -> None:
        """Raise `PermissionError` (HTTP 403) when the user may not do ``action``."""
        if not self.allowed(action, dag_id):
            need = LEVEL_NAMES[ACTIONS[action]]
            have = LEVEL_NAMES[self.level(dag_id)]
            where = f" on {dag_id}" if dag_id else ""
            msg = f"{action} needs the {need} role{where}; {self.name} is {have}"
            raise PermissionError(msg)
