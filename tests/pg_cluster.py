"""A throwaway PostgreSQL cluster for tests: initdb into a folder, serve on a socket there.

Used by `.ci/run` (`python tests/pg_cluster.py start DIR` prints the URL, `stop DIR` stops it)
and by the `postgres_url` fixture when AUTONOMIC_TEST_POSTGRES=start. The server listens only
on a Unix socket inside DIR (no TCP port), fsync stays on (the crash tests need real
durability), and as root the cluster runs as the `postgres` user, which initdb requires.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["find_bin", "start", "stop"]

PORT = 5432  # only names the socket file: listen_addresses is empty, no TCP


def find_bin() -> Path | None:
    """The bin folder of the newest installed server (Debian's layout first), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _major(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


def _as_owner(folder: Path) -> tuple[list[str], int | None]:
    """The command prefix and uid to run the server as: ourselves, or `postgres` as root."""
    if os.geteuid() != 0:
        return [], None
    user = pwd.getpwnam("postgres")
    for path in (folder, *folder.parents):
        if path == Path("/") or path.stat().st_uid == user.pw_uid:
            break
        # The server must reach its data folder: let others traverse (not list) the parents.
        path.chmod(path.stat().st_mode | 0o001)
    os.chown(folder, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", "postgres", "--"], user.pw_uid


def url(folder: Path) -> str:
    return f"postgresql:///postgres?host={folder.resolve()}&port={PORT}&user=postgres"


def start(folder: Path) -> str:
    """Create and start a cluster in `folder` (made if missing); return its URL."""
    binaries = find_bin()
    if binaries is None:
        raise RuntimeError("no PostgreSQL server binaries: apt-get install postgresql")
    folder.mkdir(parents=True, exist_ok=True)
    prefix, _ = _as_owner(folder)
    data = folder / "data"
    run = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    subprocess.run(
        [*prefix, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
        **run,  # type: ignore[call-overload]
    )
    options = (
        f"-c listen_addresses='' -c unix_socket_directories='{folder.resolve()}' -p {PORT} "
        "-c max_connections=200 -c shared_buffers=128MB"
    )
    subprocess.run(
        [
            *prefix,
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "server.log"),
            "-o",
            options,
            "-w",
            "start",
        ],
        **run,  # type: ignore[call-overload]
    )
    return url(folder)


def stop(folder: Path) -> None:
    """Stop the cluster in `folder`; nothing if it is not running. An immediate shutdown: the
    cluster is thrown away next, and a fast one first writes every dirty buffer out (a
    checkpoint that took 20 s of a loaded machine after the suite)."""
    binaries = find_bin()
    data = folder / "data"
    if binaries is None or not (data / "postmaster.pid").exists():
        return
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
        check=False,
        stdout=subprocess.DEVNULL,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        sys.stderr.write("usage: pg_cluster.py start|stop DIR\n")
        return 2
    folder = Path(argv[1])
    if argv[0] == "start":
        try:
            print(start(folder))
        except subprocess.CalledProcessError as exc:
            sys.stderr.write(exc.stderr.decode(errors="replace") if exc.stderr else str(exc))
            return 1
    else:
        stop(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
