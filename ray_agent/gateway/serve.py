"""Ray Serve's deploy config made per user: a user's PUT replaces that user's applications only.

Serve's REST API is declarative for the whole cluster: a PUT of `/api/serve/applications/` replaces every
application, and those missing from the body are deleted. The gateway therefore sends Ray a merged config:

- the caller's applications as sent, each with its owner stamped into `runtime_env.env_vars` (SERVE_OWNER_ENV_VAR);
- every other owner's application exactly as deployed (`deployed_app_config` of Ray's GET);
- the cluster's own settings as they run (proxy_location, http_options, grpc_options, target_capacity).

An application of the caller's that the body leaves out is deleted, as Ray would. Only admins may change the
cluster's settings; a user's top-level logging_config is applied to that user's applications (which is where Ray
applies it too), not to Serve's proxies and controller. `plan` is pure: the handler reads Ray's state, plans,
and sends the plan's document.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ray_agent.users import SERVE_OWNER_ENV_VAR, UNKNOWN_OWNER, USER_NAME, serve_app_owner

# Set when Serve starts and the same for every application: the cluster's, changed by admins only.
CLUSTER_FIELDS = ("proxy_location", "http_options", "grpc_options", "target_capacity")
# Cluster-wide too, and not readable back from Ray to compare: only admins may give them at all.
ADMIN_FIELDS = ("controller_options", "tracing_config")
USER_FIELDS = ("applications", "logging_config")
_KNOWN_FIELDS = (*USER_FIELDS, *CLUSTER_FIELDS, *ADMIN_FIELDS)
# An application that is being deleted has no config left: its name is free again.
_DELETING = "DELETING"
_DEFAULT_ROUTE = "/"  # Serve's route_prefix when a config gives none


class Refusal(Exception):
    """A request the gateway answers itself: the status and the message the CLI prints."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Deployed:
    """One application as Ray's GET reports it."""

    name: str
    owner: str
    status: str
    route_prefix: str | None
    source: str
    config: dict[str, Any] | None  # None: deployed with serve.run (imperative), or being deleted


@dataclass(frozen=True, slots=True)
class Plan:
    document: dict[str, Any]  # what Ray is sent
    deployed: list[str]  # the caller's applications in it
    removed: list[str]  # the caller's applications it deletes
    kept: list[str]  # the other owners' applications it carries as they are
    replaced_owners: list[tuple[str, str]] = field(default_factory=list)  # (application, owner claimed)


def deployed_apps(details: Any) -> dict[str, Deployed]:
    """The applications in Ray's `GET /api/serve/applications/` answer, by name."""
    apps = details.get("applications") if isinstance(details, dict) else None
    found = {}
    for name, app in (apps or {}).items():
        if not isinstance(app, dict):
            continue
        config = app.get("deployed_app_config")
        config = config if isinstance(config, dict) else None
        found[name] = Deployed(
            name=name,
            owner=serve_app_owner(config),
            status=str(app.get("status", "")),
            route_prefix=app.get("route_prefix"),
            source=str(app.get("source", "")),
            config=config,
        )
    return found


def serve_running(details: Any) -> bool:
    """Serve's controller answers with its HTTP options; a cluster without Serve has none."""
    return isinstance(details, dict) and isinstance(details.get("http_options"), dict)


def _applications(body: Any) -> list[dict[str, Any]]:
    """The body's applications, each checked for what the ownership rule reads; Ray judges the rest."""
    if not isinstance(body, dict):
        raise Refusal(400, "the body must be a JSON object: Serve's deploy config, with an applications list")
    apps = body.get("applications")
    if apps is None:
        raise Refusal(400, "applications: missing; Serve's deploy config lists its applications under applications")
    if not isinstance(apps, list):
        raise Refusal(400, f"applications: must be a list of applications, got {type(apps).__name__}")
    for index, app in enumerate(apps):
        where = f"applications[{index}]"
        if not isinstance(app, dict):
            raise Refusal(400, f"{where}: must be an object with a name, got {type(app).__name__}")
        name = app.get("name")
        if not isinstance(name, str) or not name:
            raise Refusal(400, f"{where}.name: must be a non-empty string (each application is named)")
        runtime_env = app.get("runtime_env")
        if runtime_env is not None and not isinstance(runtime_env, dict):
            raise Refusal(400, f"{where}.runtime_env: must be an object ({name})")
        env_vars = (runtime_env or {}).get("env_vars")
        if env_vars is not None and not isinstance(env_vars, dict):
            raise Refusal(400, f"{where}.runtime_env.env_vars: must be an object ({name})")
    return apps


def _check_cluster_fields(body: dict[str, Any], details: dict[str, Any]) -> None:
    """A user's config may repeat the cluster's settings (as `serve build` writes them) but not change them."""
    unknown = [key for key in body if key not in _KNOWN_FIELDS]
    if unknown:
        raise Refusal(400, f"{unknown[0]}: not a field of Serve's deploy config that a user may set "
                           f"(allowed: {', '.join(USER_FIELDS + CLUSTER_FIELDS)})")  # fmt: skip
    for key in ADMIN_FIELDS:
        if body.get(key) is not None:
            raise Refusal(403, f"{key}: Serve's {key} is the cluster's, set by an admin; leave it out of your config")
    for key in CLUSTER_FIELDS:
        if key not in body:
            continue
        given, running = body[key], details.get(key)
        if isinstance(running, dict):
            if not isinstance(given, dict):
                raise Refusal(400, f"{key}: must be an object, got {type(given).__name__}")
            pairs = [(f"{key}.{sub}", value, running.get(sub)) for sub, value in given.items()]
        else:
            pairs = [(key, given, running)]
        for name, value, current in pairs:
            if value != current:
                raise Refusal(403, f"{name}: {value!r} is not the cluster's {current!r}; {', '.join(CLUSTER_FIELDS)} "
                                   "are the cluster's, set by an admin: leave them out of your config")  # fmt: skip
    logging_config = body.get("logging_config")
    if logging_config is not None and not isinstance(logging_config, dict):
        raise Refusal(400, f"logging_config: must be an object, got {type(logging_config).__name__}")


def _owner_for(app: dict[str, Any], existing: Deployed | None, user: str, admin: bool) -> str:
    """Who owns an application once deployed: the caller, or for an admin, whom the config names."""
    if not admin:
        return user
    claimed = app.get("runtime_env", {}).get("env_vars", {}).get(SERVE_OWNER_ENV_VAR)
    if claimed is not None:
        if not isinstance(claimed, str) or not USER_NAME.fullmatch(claimed):
            raise Refusal(400, f"applications ({app['name']}).runtime_env.env_vars.{SERVE_OWNER_ENV_VAR}: must be "
                               f"a user name, got {claimed!r}")  # fmt: skip
        return claimed
    if existing is not None and existing.owner != UNKNOWN_OWNER:
        return existing.owner
    return user


def plan(body: Any, details: Any, user: str, admin: bool) -> Plan:
    """The config to send Ray for `user`'s PUT, or a Refusal that names the key or the application."""
    apps = _applications(body)
    running = serve_running(details)
    if not admin:
        if not running:
            raise Refusal(503, "Ray Serve is not running on this cluster: an admin starts it (serve start)")
        _check_cluster_fields(body, details)
    current = {name: app for name, app in deployed_apps(details).items() if app.status != _DELETING}
    names = {app["name"] for app in apps}

    mine: list[dict[str, Any]] = []
    replaced = []
    for app in apps:
        name = app["name"]
        existing = current.get(name)
        if not admin and existing is not None and existing.owner != user:
            raise Refusal(403, f"application {name} belongs to {existing.owner}")
        stamped = copy.deepcopy(app)
        runtime_env = stamped["runtime_env"] = stamped.get("runtime_env") or {}  # null is Ray's empty too
        env_vars = runtime_env["env_vars"] = runtime_env.get("env_vars") or {}
        owner = _owner_for(stamped, existing, user, admin)
        claimed = env_vars.get(SERVE_OWNER_ENV_VAR)
        if claimed is not None and claimed != owner:
            replaced.append((name, claimed))
        env_vars[SERVE_OWNER_ENV_VAR] = owner
        mine.append(stamped)

    others = [app for app in current.values() if app.name not in names and app.owner != user]
    removed = sorted(app.name for app in current.values() if app.name not in names and app.owner == user)
    taken = {app.route_prefix: app for app in others if app.route_prefix is not None}
    for app in mine:
        route = app.get("route_prefix", _DEFAULT_ROUTE)
        if route in taken:
            holder = taken[route]
            raise Refusal(409, f"application {app['name']}: route_prefix {route} is taken by application "
                               f"{holder.name} of {holder.owner}; choose another route_prefix")  # fmt: skip

    logging_config = body.get("logging_config")
    if not admin and logging_config is not None:
        for app in mine:
            if app.get("logging_config") is None:
                app["logging_config"] = copy.deepcopy(logging_config)

    document: dict[str, Any] = {key: details[key] for key in CLUSTER_FIELDS if running and key in details}
    if admin:
        document.update({key: value for key, value in body.items() if key != "applications"})
    # Imperative applications (serve.run) have no config to send: Ray keeps them through a PUT anyway.
    document["applications"] = [app.config for app in others if app.config is not None] + mine
    return Plan(
        document=document,
        deployed=[app["name"] for app in mine],
        removed=removed,
        kept=sorted(app.name for app in others),
        replaced_owners=replaced,
    )
