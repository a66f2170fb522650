"""A normal install (`pip install .`, not editable) runs: the wheel carries every Lua script and
redis.conf, and the `score-service` it installs finds them and serves."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support import ROOT

from service.dev.servers import free_port, wait_for

# what a source tree holds besides the project (and what a build must not be polluted by)
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".data", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis", "results",
)  # fmt: skip


@dataclass
class Installed:
    wheel: Path
    target: Path  # the wheel installed here, as site-packages would hold it

    def env(self, base: dict[str, str]) -> dict[str, str]:
        # the installed copy first: neither the checkout nor the editable install is reachable
        return {**base, "PYTHONPATH": str(self.target)}

    def run(self, base: dict[str, str], *args: str, cwd: Path) -> str:
        out = subprocess.run(
            args, env=self.env(base), cwd=cwd, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The wheel `pip wheel --no-deps` builds from a copy of the checkout, installed apart."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # no build isolation: the dev extra's setuptools builds it, with nothing fetched
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (work / "dist").glob("score_service-*.whl")
    target = work / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    yield Installed(wheel, target)


def test_the_wheel_carries_every_lua_script_and_redis_conf(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    scripts = sorted(path.name for path in (ROOT / "lua").glob("*.lua"))
    assert scripts, "no lua/*.lua in the checkout"
    for name in scripts:
        assert f"service/lua/{name}" in names
    assert "service/conf/redis.conf" in names


def test_the_wheel_carries_every_module(installed: Installed) -> None:
    # pyproject.toml names the packages one by one: a new subpackage must be added there
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = sorted(
        path.relative_to(ROOT).as_posix()
        for package in ("service", "persister")
        for path in (ROOT / package).rglob("*.py")
    )
    assert "service/live/endpoints.py" in modules and "service/dev/servers.py" in modules
    assert [module for module in modules if module not in names] == []


def test_the_installed_package_loads_them(installed: Installed, tmp_path: Path) -> None:
    # every script by the loader the service uses, and the config a dev Redis starts with
    check = """
import service, service.scripts as s, service.dev.servers as d, pathlib, sys
from service.dev.servers import RedisServer
print(pathlib.Path(service.__file__).parent)
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.lua")):
    name = path.name.split("-")[0]
    assert s.load(name).body == path.read_text(), name
print(d.REDIS_CONF)
server = RedisServer(pathlib.Path(sys.argv[2])).start()
server.stop()
import service.shipped as shipped
guides = sorted(p.name for p in shipped.DEPLOY_DIR.glob("*.conf"))
assert guides == ["redis-cluster.conf", "redis-replicated.conf", "sentinel.conf"], guides
print(shipped.DEPLOY_DIR)
"""
    out = installed.run(
        {}, sys.executable, "-c", check, str(ROOT / "lua"), str(tmp_path / "redis"), cwd=tmp_path
    )
    package, conf, deploy = out.split()
    assert Path(package) == installed.target / "service"
    assert Path(conf) == installed.target / "service" / "conf" / "redis.conf"
    assert Path(deploy) == installed.target / "service" / "conf" / "deploy"


def test_the_installed_score_service_serves_scores(
    installed: Installed, env: dict[str, str], add_users, token, tmp_path: Path
) -> None:
    (alice,) = add_users(count=1)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(installed.target / "bin" / "score-service"), "serve", "--port", str(port)],
            env=installed.env(env), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()[-2000:]
            return httpx.get(base + "/readyz", timeout=1).status_code == 200

        wait_for(ready, 30, "the installed score-service")
        resp = httpx.post(
            base + "/api/v1/score",
            json={"user_id": alice, "score_increase": 7},
            headers={"Authorization": f"Bearer {token(alice)}"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["new_score"] == 7
    finally:
        process.terminate()
        process.wait(15)
