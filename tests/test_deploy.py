"""deploy/: the systemd unit, the example config and the container build, checked as shipped."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "waystation.service"
CONFIG = DEPLOY / "waystation.toml"
CONTAINERFILE = DEPLOY / "Containerfile"
EXEC = "/usr/local/bin/waystation"
GRACE = 10.0  # core.settings.ServerSettings.shutdown_grace


def _unit() -> dict[str, list[str]]:
    """The unit's settings, each key's values in order (comments and sections dropped)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


def test_unit_runs_the_server_with_the_shipped_config_path() -> None:
    unit = _unit()
    assert unit["ExecStart"] == [f"{EXEC} server run --config /etc/waystation/waystation.toml"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["StateDirectory"] == ["waystation"]
    for hardening in ("NoNewPrivileges", "DynamicUser", "ProtectHome", "PrivateTmp"):
        assert unit[hardening] == ["yes"], hardening
    assert unit["ProtectSystem"] == ["strict"]


def test_unit_stops_later_than_the_servers_grace_period() -> None:
    timeout = _unit()["TimeoutStopSec"][0]
    assert timeout.isdigit(), "TimeoutStopSec in plain seconds"
    assert int(timeout) >= 2 * GRACE


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify wants ExecStart's binary to exist: the same unit, pointed at this interpreter.
    text = UNIT.read_text()
    assert f"ExecStart={EXEC} " in text
    unit = tmp_path / "waystation.service"
    unit.write_text(text.replace(f"ExecStart={EXEC}", f"ExecStart={sys.executable}"))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in done.stderr.splitlines() if "waystation" in line]
    assert done.returncode == 0, done.stderr
    assert not ours, "\n".join(ours)  # unknown keys and bad values are warnings only


def _server_config(config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """`waystation server config --config FILE --json`, no WAYSTATION_* from our environment."""
    waystation = Path(sys.executable).with_name("waystation")
    command = [str(waystation)] if waystation.exists() else [sys.executable, "-m"]
    if not waystation.exists():
        command.append("waystation.cli.main")
    return subprocess.run(
        [*command, "server", "config", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
    )


def test_example_config_is_accepted_as_shipped(tmp_path: Path) -> None:
    done = _server_config(CONFIG, tmp_path)
    assert done.returncode == 0, done.stderr
    assert '"/var/lib/waystation"' in done.stdout


def test_example_config_with_tls_uncommented_is_accepted(tmp_path: Path) -> None:
    """The commented TLS lines are valid keys too (the files exist here)."""
    (tmp_path / "server.pem").write_text("cert")
    (tmp_path / "server-key.pem").write_text("key")
    text = CONFIG.read_text()
    for key in ("tls-cert", "tls-key"):
        assert f"# {key} = " in text
        text = text.replace(f"# {key} = ", f"{key} = ")
    text = text.replace("/run/credentials/waystation.service", str(tmp_path))
    text = text.replace("# db = ", "db = ")
    config = tmp_path / "waystation.toml"
    config.write_text(text)
    done = _server_config(config, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "postgresql://waystation@db.internal" in done.stdout
    assert str(tmp_path / "server-key.pem") in done.stdout


def test_containerfile_installs_from_the_tree_and_runs_unprivileged() -> None:
    text = CONTAINERFILE.read_text()
    assert "COPY src ./src" in text and "pip install ." in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def _builder() -> tuple[list[str], str]:
    """A container build command that works here, or ([], why there is none)."""
    reasons = []
    for name in ("podman", "docker", "buildah"):
        path = shutil.which(name)
        if path is None:
            reasons.append(f"no {name} on PATH")
            continue
        probe = [path, "info"]
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            reasons.append(f"{name} is on PATH but `{name} info` fails: {last}")
            continue
        verb = "bud" if name == "buildah" else "build"
        return [path, verb], ""
    return [], "no working container builder: " + "; ".join(reasons)


def test_container_image_builds(tmp_path: Path) -> None:
    builder, why = _builder()
    if not builder:
        pytest.skip(why)
    # A context of just what the build copies (the tree holds a venv and caches).
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(
        ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    tag = f"waystation-test-{uuid.uuid4().hex[:8]}"
    build = [*builder, "-f", str(CONTAINERFILE), "-t", tag, str(context)]
    done = subprocess.run(build, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tool = builder[0]
    try:
        if Path(tool).name != "buildah":
            run = [tool, "run", "--rm", "--entrypoint", "id", tag, "-u"]
            uid = subprocess.run(run, capture_output=True, text=True, timeout=120)
            assert uid.returncode == 0, uid.stderr
            assert uid.stdout.strip() not in ("", "0")
    finally:
        subprocess.run([tool, "rmi", "-f", tag], capture_output=True, timeout=120)
