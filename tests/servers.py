"""Real servers for the scale-out tests: a throwaway PostgreSQL cluster and a Chroma server, each on
127.0.0.1 in a temp folder, stopped and removed after. conftest.py exposes them as session fixtures."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import free_port, wait_for_http


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.fail("PostgreSQL server binaries missing (bash scripts/setup.sh installs Debian's postgresql)")
    return Path(found[-1]).parent


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """initdb + pg_ctl on a free loopback port; yields the superuser URL of the `postgres` database.
    As root the cluster runs as the `postgres` user (initdb refuses root)."""
    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="msr-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(*args: str, check: bool = True) -> None:
        res = subprocess.run([*as_user, *args], capture_output=True, text=True)
        if check and res.returncode:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            pytest.fail(f"{Path(args[0]).name} failed: {res.stdout}{res.stderr}{log[-2000:]}")

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "msr", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "-t", "60", "start")
        yield f"postgresql://msr@127.0.0.1:{port}/postgres"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def postgres_database(admin_url: str, name: str) -> str:
    """A new empty database on the cluster; returns its URL."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}"')
        con.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def chroma_server() -> Iterator[tuple[str, int]]:
    """`chroma run` from this environment on a free loopback port; yields (host, port)."""
    exe = Path(sys.executable).parent / "chroma"
    root = Path(tempfile.mkdtemp(prefix="msr-chroma-"))
    port = free_port()
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen([str(exe), "run", "--path", str(root / "data"), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/v2/heartbeat", proc)  # its output: root/log
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
