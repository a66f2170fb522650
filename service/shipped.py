"""Where the files the service ships beside its code are: the Lua scripts, redis.conf and the
Sentinel and Cluster configuration guides.

They live at the top of the repository (`lua/`, `redis.conf`, `deploy/`), where a reader looks
for them. A wheel carries them as package data of `service` (`service/lua/*.lua`,
`service/conf/redis.conf`, `service/conf/deploy/*.conf`; pyproject.toml maps them in); a
checkout, or an editable install of one, reads them where they are.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _find(in_package: str, in_checkout: str) -> Path:
    # A wheel is installed as plain files (never imported from a zip), so the resource is a
    # real path: redis-server must be given its config file by name.
    packaged = Path(str(files("service").joinpath(in_package)))
    return packaged if packaged.exists() else _CHECKOUT / in_checkout


LUA_DIR = _find("lua", "lua")
REDIS_CONF = _find("conf/redis.conf", "redis.conf")
DEPLOY_DIR = _find("conf/deploy", "deploy")
"""redis-replicated.conf, redis-cluster.conf, sentinel.conf: what a Sentinel or Cluster
deployment adds to redis.conf (the README's "Deploying")."""
