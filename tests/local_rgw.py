"""A throwaway single-node Ceph RGW on 127.0.0.1, for tests and local runs.

This module owns everything about the local Ceph cluster the tests talk S3 to: which Debian packages
it needs, how one is booted (one monitor, one memstore OSD, one radosgw with the beast frontend), the
S3 user and keys it serves, and how exactly the processes it started are stopped again. Everything a
cluster writes lives under one work directory (config, keyring, mon/osd/rgw data, logs, pid files,
admin sockets); nothing touches /etc/ceph or /var/lib/ceph, and every port is picked free on the
loopback interface, so several clusters can run side by side in different directories.

Importable (stdlib only at import time; boto3 is imported when a client is asked for) and a CLI:

    python tests/local_rgw.py start --dir D [--port P]      # detached; writes D/env.sh, prints exports
    python tests/local_rgw.py stop --dir D
    python tests/local_rgw.py exec --dir D [--port P] -- CMD ARGS...
    python tests/local_rgw.py ensure-packages
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

# What a person debugging a cluster reaches for too; ceph-authtool is not run here (the keys are made in
# Python, one process fewer per entity) but ships in the same package as `ceph`.
REQUIRED_BINARIES = (
    "ceph-mon",
    "ceph-osd",
    "radosgw",
    "ceph-authtool",
    "monmaptool",
    "radosgw-admin",
    "ceph",
)
DEBIAN_PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
APT_INSTALL_COMMAND = (
    f"apt-get update && apt-get install -y --no-install-recommends {' '.join(DEBIAN_PACKAGES)}"
)

DEFAULT_ACCESS_KEY = "xray-test-access"
DEFAULT_SECRET_KEY = "xray-test-secret-key"
S3_USER_ID = "xray-test"

MON_ID = "a"
OSD_ID = 0
RGW_NAME = "client.rgw.xray"
# Start order; stop() walks it backwards so the OSD can still tell the monitor it is leaving and the
# gateway can still unwatch its objects on the OSD, which keeps every shutdown well under a second.
DAEMON_NAMES = (f"mon.{MON_ID}", f"osd.{OSD_ID}", RGW_NAME)

# Marks a work directory as ours, so start() never wipes a directory it did not create.
CONF_HEADER = "# Throwaway cluster written by tests/local_rgw.py; the whole directory is disposable.\n"

POLL_SECONDS = 0.05
STOP_GRACE_SECONDS = 5.0
LOG_TAIL_LINES = 40
# beast's access line (debug rgw >= 1, the default): `beast: 0x..: 127.0.0.1 - user [time] "GET /b/k HTTP/1.1" 404 ...`
_ACCESS_LINE = re.compile(r'beast: \S+ \S+ - \S+ \[[^\]]*\] "([A-Z]+) (\S+) HTTP/[0-9.]+" ([0-9]{3}) ')


class RGWError(RuntimeError):
    """The local cluster could not be installed, booted or stopped."""


def missing_packages() -> list[str]:
    """The Ceph binaries this module runs that are not on PATH."""
    return [binary for binary in REQUIRED_BINARIES if shutil.which(binary) is None]


def ensure_packages(log: Callable[[str], None] | None = None) -> None:
    """Install Debian's Ceph packages when a binary is missing; only root can, others are told how."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise RGWError(
            f"Ceph binaries missing from PATH: {', '.join(missing)}. Install them as root with:\n"
            f"  sudo sh -c '{APT_INSTALL_COMMAND}'"
        )
    if log:
        log(f"installing {' '.join(DEBIAN_PACKAGES)} (missing: {', '.join(missing)})")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES],
    ):
        result = subprocess.run(command, env=apt_env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RGWError(f"{' '.join(command)} failed ({result.returncode}):\n{_tail(result.stderr)}")
    still_missing = missing_packages()
    if still_missing:
        raise RGWError(f"still missing after apt-get install: {', '.join(still_missing)}")


class LocalRGW:
    """One throwaway Ceph cluster (mon + memstore OSD + radosgw) under `workdir`, serving S3 on `port`."""

    region = "default"

    def __init__(
        self,
        workdir: Path | str,
        port: int | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        detach: bool = False,
        log: Callable[[str], None] | None = None,
        verbose: bool = False,
    ) -> None:
        """Nothing runs until start(). `port=None` picks a free loopback port now, so `endpoint_url` and
        env() are known before the boot. `detach=True` lets the daemons outlive this Python process (the
        CLI's `start`); otherwise, when started from the main thread, the kernel kills them if this
        process dies without calling stop() (a killed test run must not leak a cluster)."""
        self.workdir = Path(workdir).absolute()
        self.conf_path = self.workdir / "ceph.conf"
        self.access_key = access_key
        self.secret_key = secret_key
        self.detach = detach
        self._log = log if log is not None else (_log_to_stderr if verbose else None)
        self.port = port or _free_loopback_ports(1)[0]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._started_at = 0.0
        # Seconds from start() to S3 ready, for whoever measures the cost of the fixture.
        self.boot_seconds: float | None = None

    # -- public API ---------------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> LocalRGW:
        """Boot the cluster and create the S3 user; on any failure stop what was started and raise."""
        if self._processes:
            raise RGWError(f"cluster in {self.workdir} is already running")
        missing = missing_packages()
        if missing:
            raise RGWError(
                f"Ceph binaries missing from PATH: {', '.join(missing)}; run as root: {APT_INSTALL_COMMAND}"
            )
        self._started_at = time.monotonic()
        deadline = self._started_at + timeout
        try:
            stop_workdir(self.workdir)
            self._prepare_workdir()
            self._boot(deadline)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - self._started_at
        self._say(f"S3 ready at {self.endpoint_url} after {self.boot_seconds:.1f} s")
        return self

    def stop(self) -> None:
        """Stop the daemons this object started (newest first) and wait until each has exited."""
        for name in reversed(DAEMON_NAMES):
            process = self._processes.pop(name, None)
            if process is None:
                continue
            _terminate_child(process)
            self._remove_pid_file(name, process.pid)
        self._processes.clear()

    # -- gateway faults (the monitor and the OSD keep running, and with them every object) ------------

    def stop_gateway(self) -> None:
        """Stop radosgw alone, as an outage of the S3 endpoint: connections to its port are refused."""
        process = self._processes.pop(RGW_NAME, None)
        if process is None:
            raise RGWError(f"radosgw of {self.workdir} is not running")
        _terminate_child(process)
        self._remove_pid_file(RGW_NAME, process.pid)

    def start_gateway(self, timeout: float = 60) -> None:
        """Start radosgw again after stop_gateway(), on the same port, and wait until it answers HTTP."""
        if RGW_NAME in self._processes:
            raise RGWError(f"radosgw of {self.workdir} is already running")
        self._spawn(RGW_NAME, ["radosgw", "-f", "-n", RGW_NAME])
        self._wait_for_http(time.monotonic() + timeout)

    @contextlib.contextmanager
    def gateway_paused(self) -> Iterator[None]:
        """radosgw frozen (SIGSTOP) for the block, as a stalled gateway: the kernel still accepts connections,
        nothing answers them. Resumed (SIGCONT) on leaving, also when the block raises; requests it received
        meanwhile are then served, even those whose clients have given up."""
        process = self._processes[RGW_NAME]
        process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            process.send_signal(signal.SIGCONT)

    def requests_served(self) -> list[tuple[str, str, int]]:
        """(method, path as sent, status) of each request radosgw has answered, from beast's access lines in its
        log. The log is written asynchronously: the newest answers may show a few milliseconds late."""
        log = self.workdir / "log" / f"{RGW_NAME}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return [(method, path, int(status)) for method, path, status in _ACCESS_LINE.findall(text)]

    def env(self) -> dict[str, str]:
        """The environment variables a client of this cluster needs."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def pids(self) -> dict[str, int]:
        """Daemon name -> pid of the daemons this object is running."""
        return {name: process.pid for name, process in self._processes.items()}

    def s3_client(self) -> Any:
        """A boto3 S3 client for this cluster (path-style: RGW has no wildcard DNS here)."""
        return self._boto3_client("s3")

    def sns_client(self) -> Any:
        """A boto3 SNS client on the same endpoint: RGW serves its topic API (CreateTopic ...) there."""
        return self._boto3_client("sns")

    def __enter__(self) -> LocalRGW:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- booting ------------------------------------------------------------------------------------

    def _boot(self, deadline: float) -> None:
        mon_v2_port, mon_v1_port = _free_loopback_ports(2, exclude={self.port})
        fsid = str(uuid.uuid4())
        osd_uuid = str(uuid.uuid4())
        mon_addrs = f"[v2:127.0.0.1:{mon_v2_port},v1:127.0.0.1:{mon_v1_port}]"
        self._write_keyring()
        self._write_conf(fsid, mon_addrs)

        monmap = self.workdir / "monmap"
        self._run_tool(
            "monmaptool",
            ["monmaptool", "--create", "--fsid", fsid, "--enable-all-features",
             "--addv", MON_ID, mon_addrs, str(monmap)],
            deadline,
        )  # fmt: skip
        self._run_tool(
            "mon-mkfs",
            ["ceph-mon", "--mkfs", "-i", MON_ID, "--monmap", str(monmap), "--keyring", str(self._keyring)],
            deadline,
        )
        self._spawn(f"mon.{MON_ID}", ["ceph-mon", "-f", "-i", MON_ID])
        self._say("mon started")

        # The memstore mkfs is local to the OSD directory, so it runs while the monitor forms its quorum;
        # `ceph osd new` needs the quorum and simply waits for it, which saves polling `ceph mon stat`.
        osd_mkfs = self._start_tool(
            "osd-mkfs", ["ceph-osd", "--mkfs", "-i", str(OSD_ID), "--osd-uuid", osd_uuid]
        )
        self._run_tool("osd-new", ["ceph", "osd", "new", osd_uuid, str(OSD_ID)], deadline)
        self._wait_tool(osd_mkfs, deadline)
        self._say("osd registered and formatted")
        self._spawn(f"osd.{OSD_ID}", ["ceph-osd", "-f", "-i", str(OSD_ID)])

        # radosgw needs no wait for the OSD: its pool creation and first writes block until the OSD is
        # up, so the HTTP poll below covers both (and a dead OSD is noticed by the liveness check).
        self._spawn(RGW_NAME, ["radosgw", "-f", "-n", RGW_NAME])
        self._wait_for_http(deadline)
        self._say("rgw answers HTTP")
        self._run_tool(
            "user-create",
            ["radosgw-admin", "user", "create", "--uid", S3_USER_ID, "--display-name", "xray test user",
             "--access-key", self.access_key, "--secret-key", self.secret_key],
            deadline,
        )  # fmt: skip

    def _prepare_workdir(self) -> None:
        workdir = self.workdir
        if workdir.exists() and any(workdir.iterdir()) and not _is_our_workdir(workdir):
            raise RGWError(f"{workdir} is not empty and was not made by local_rgw.py; refusing to wipe it")
        shutil.rmtree(workdir, ignore_errors=True)
        for sub in ("run", "log", "pids", "crash", "rgw", f"mon/ceph-{MON_ID}", f"osd/ceph-{OSD_ID}"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)

    @property
    def _keyring(self) -> Path:
        return self.workdir / "keyring"

    def _write_keyring(self) -> None:
        # One keyring for every entity: `ceph-mon --mkfs` imports all of them with their caps, so the
        # OSD and the gateway can authenticate without any `ceph auth` round trips.
        entities = {
            "mon.": {"mon": "allow *"},
            "client.admin": {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"},
            f"osd.{OSD_ID}": {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
            RGW_NAME: {"mon": "allow rw", "osd": "allow rwx", "mgr": "allow rw"},
        }
        sections = []
        for entity, caps in entities.items():
            lines = [f"[{entity}]", f"\tkey = {_new_cephx_secret()}"]
            lines += [f'\tcaps {service} = "{cap}"' for service, cap in caps.items()]
            sections.append("\n".join(lines))
        self._keyring.write_text("\n".join(sections) + "\n")
        self._keyring.chmod(0o600)

    def _write_conf(self, fsid: str, mon_addrs: str) -> None:
        w = self.workdir
        conf = f"""{CONF_HEADER}
[global]
fsid = {fsid}
mon host = {mon_addrs}
keyring = {self._keyring}
run dir = {w}/run
crash dir = {w}/crash
log file = {w}/log/$name.log
log to stderr = false
err to stderr = false
mon cluster log file = {w}/log/cluster.log
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
# The monitor batches map changes for `paxos propose interval` (1 s); radosgw's first start makes
# about a dozen of them (pools, application tags), so the default alone costs ~11 s of boot time.
paxos propose interval = 0.01
# A nearly full disk must not make the throwaway monitor refuse to start (default: below 5 % free).
mon data avail crit = 0

[mon]
mon data = {w}/mon/$cluster-$id
admin socket = {w}/run/$name.asok
pid file = {w}/run/$name.pid

[osd]
osd data = {w}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 1073741824
public addr = 127.0.0.1
cluster addr = 127.0.0.1
admin socket = {w}/run/$name.asok
pid file = {w}/run/$name.pid

[{RGW_NAME}]
rgw frontends = beast endpoint=127.0.0.1:{self.port}
rgw data = {w}/rgw
admin socket = {w}/run/$name.asok
pid file = {w}/run/$name.pid
"""
        self.conf_path.write_text(conf)

    # -- processes ----------------------------------------------------------------------------------

    def _popen(self, label: str, argv: list[str], *, own_session: bool) -> subprocess.Popen[bytes]:
        """Run a Ceph binary on this cluster's conf; its stdout and stderr go to log/LABEL.out."""
        with self._output_path(label).open("wb") as output:
            return subprocess.Popen(
                [argv[0], "--conf", str(self.conf_path), *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # CEPH_CONF too, so nothing a tool spawns can fall back to /etc/ceph/ceph.conf.
                env={**os.environ, "CEPH_CONF": str(self.conf_path)},
                cwd=self.workdir,
                start_new_session=own_session,
                preexec_fn=self._death_signal_setter(),
            )

    def _spawn(self, name: str, argv: list[str]) -> None:
        # Own session: a Ctrl-C meant for the caller must not reach the daemons half-way through a
        # test (stop() shuts them down in order), and the CLI's `start` must leave them running.
        process = self._popen(name, argv, own_session=True)
        self._processes[name] = process
        self._pid_file(name).write_text(f"{process.pid}\n")

    def _start_tool(self, label: str, argv: list[str]) -> tuple[str, subprocess.Popen[bytes]]:
        return label, self._popen(label, argv, own_session=False)

    def _run_tool(self, label: str, argv: list[str], deadline: float) -> None:
        self._wait_tool(self._start_tool(label, argv), deadline)

    def _wait_tool(self, tool: tuple[str, subprocess.Popen[bytes]], deadline: float) -> None:
        """Wait for a short-lived tool, failing fast if a daemon it depends on dies meanwhile."""
        label, process = tool
        try:
            while process.poll() is None:
                self._check_daemons_alive()
                if time.monotonic() > deadline:
                    output = self._output_path(label).read_text(errors="replace")
                    raise RGWError(
                        f"{label} did not finish in time:\n{_tail(output)}\n{self._all_logs_tail()}"
                    )
                time.sleep(POLL_SECONDS)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0:
            output = self._output_path(label).read_text(errors="replace")
            raise RGWError(f"{label} failed with exit code {process.returncode}:\n{_tail(output)}")

    def _wait_for_http(self, deadline: float) -> None:
        # An opener without proxy handling: a proxy from the environment must not see loopback traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            self._check_daemons_alive()
            try:
                with opener.open(self.endpoint_url, timeout=2) as response:
                    response.read()  # closing unread makes radosgw log a spurious "connection reset"
                    if response.status == 200:
                        return
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RGWError(
                    f"radosgw did not answer on {self.endpoint_url} in time\n{self._all_logs_tail()}"
                )
            time.sleep(POLL_SECONDS)

    def _check_daemons_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise RGWError(
                    f"{name} exited with code {_exit_code_meaning(process.returncode)} during start\n"
                    f"{self._daemon_tail(name)}"
                )

    def _death_signal_setter(self) -> Callable[[], None] | None:
        """A preexec_fn asking the kernel to kill the child when its parent thread dies (Linux only).

        Keeps a killed test run from leaking daemons. Skipped when detaching, and off the main thread,
        because the kernel ties the signal to the *thread* that forked, not to the process."""
        if self.detach or threading.current_thread() is not threading.main_thread():
            return None
        if not sys.platform.startswith("linux"):
            return None
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child
        parent_pid = os.getpid()
        pr_set_pdeathsig = 1

        def set_death_signal() -> None:
            prctl(pr_set_pdeathsig, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

        return set_death_signal

    # -- files and diagnostics ----------------------------------------------------------------------

    def _pid_file(self, name: str) -> Path:
        return self.workdir / "pids" / f"{name}.pid"

    def _remove_pid_file(self, name: str, pid: int) -> None:
        # Only if it still names our pid: a later start() in the same directory may own it by now.
        pid_file = self._pid_file(name)
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) == pid:
                pid_file.unlink()

    def _output_path(self, label: str) -> Path:
        return self.workdir / "log" / f"{label}.out"

    def _daemon_tail(self, name: str) -> str:
        parts = []
        for path in (self.workdir / "log" / f"{name}.log", self._output_path(name)):
            if path.exists() and path.stat().st_size:
                parts.append(f"--- tail of {path} ---\n{_tail(path.read_text(errors='replace'))}")
        return "\n".join(parts) or f"(no log written by {name})"

    def _all_logs_tail(self) -> str:
        return "\n".join(self._daemon_tail(name) for name in DAEMON_NAMES if name in self._processes)

    def _say(self, message: str) -> None:
        if self._log:
            self._log(f"[{time.monotonic() - self._started_at:5.1f}s] {message}")

    def _boto3_client(self, service: str) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4" if service == "s3" else None,
            retries={"max_attempts": 3, "mode": "standard"},
            proxies={},  # never route loopback traffic through a proxy from the environment
        )
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
        )


# -- stopping what a work directory's pid files name ------------------------------------------------


def stop_workdir(workdir: Path | str) -> list[int]:
    """Stop daemons left running by a cluster in `workdir` (a detached `start`, a killed test run).

    Only pids from that directory's pid files whose command line carries that directory's ceph.conf
    are signalled, so a recycled pid or another cluster is never touched. Returns the pids stopped."""
    workdir = Path(workdir).absolute()
    conf_path = str(workdir / "ceph.conf")
    pids: list[int] = []
    for pid in _pids_from_files(workdir):
        if pid not in pids and _runs_with_conf(pid, conf_path):
            pids.append(pid)
    for pid in pids:
        _terminate_pid(pid)
    for pid_file in (workdir / "pids").glob("*.pid"):
        pid_file.unlink(missing_ok=True)
    return pids


def _pids_from_files(workdir: Path) -> Iterator[int]:
    # Our own pid files first (written the moment a daemon is spawned, in stop order), then Ceph's.
    ours = [workdir / "pids" / f"{name}.pid" for name in reversed(DAEMON_NAMES)]
    for pid_file in [*ours, *sorted((workdir / "run").glob("*.pid"))]:
        try:
            yield int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue


def _runs_with_conf(pid: int, conf_path: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return conf_path.encode() in argv and not has_exited(pid)


def has_exited(pid: int) -> bool:
    """True when `pid` has exited; a zombie nobody reaps (detached daemons) counts as exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state in ("Z", "X")


def _terminate_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_exited(pid, STOP_GRACE_SECONDS):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_exited(pid, STOP_GRACE_SECONDS):
            raise RGWError(f"pid {pid} survived SIGKILL")


def _wait_exited(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not has_exited(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _terminate_child(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- small helpers ------------------------------------------------------------------------------------


def _free_loopback_ports(count: int, exclude: Collection[int] = ()) -> list[int]:
    """Distinct ports free on 127.0.0.1 right now, none of them in `exclude`.

    The sockets are held open together so the kernel cannot hand out the same port twice; `exclude`
    covers ports already promised to a daemon that has not bound them yet."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in exclude:
                ports.append(port)
        return ports
    finally:
        for sock in sockets:
            sock.close()


def _new_cephx_secret() -> str:
    """A cephx key as ceph-authtool writes it: base64 of CryptoKey's encoding, in pure Python.

    Saves one ceph-authtool process per entity. Layout: u16 type (1 = AES), utime created
    (u32 seconds, u32 nanoseconds), u16 length, then 16 random bytes."""
    secret = os.urandom(16)
    header = struct.pack("<HIIH", 1, int(time.time()), 0, len(secret))
    return base64.b64encode(header + secret).decode()


def _is_our_workdir(workdir: Path) -> bool:
    try:
        with (workdir / "ceph.conf").open() as conf:
            return conf.readline() == CONF_HEADER
    except OSError:
        return False


def _exit_code_meaning(code: int) -> str:
    """`98 (errno: Address already in use)`: Ceph daemons exit with the errno that stopped them, and the log line
    that says so may still be unwritten (Ceph logs from a thread) when the exit is seen. 1 and 2 are plain failures."""
    meaning = os.strerror(code) if code > 2 else ""
    return f"{code} (errno: {meaning})" if meaning and not meaning.startswith("Unknown error") else str(code)


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- CLI ----------------------------------------------------------------------------------------------


def _export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def _cli_start(args: argparse.Namespace) -> int:
    rgw = LocalRGW(args.dir, args.port, detach=True, verbose=args.verbose).start(args.timeout)
    exports = _export_lines(rgw.env())
    (rgw.workdir / "env.sh").write_text(exports)
    sys.stdout.write(exports)
    return 0


def _cli_stop(args: argparse.Namespace) -> int:
    stopped = stop_workdir(args.dir)
    if args.verbose:
        _log_to_stderr(f"stopped pids {stopped}" if stopped else "nothing was running")
    return 0


def _cli_exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise RGWError("exec needs a command after --")

    def raise_on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # SIGTERM (a CI timeout, `kill`) must unwind through the finally below like Ctrl-C does.
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    rgw = LocalRGW(args.dir, args.port, verbose=args.verbose)
    try:
        rgw.start(args.timeout)
        return subprocess.run(command, env={**os.environ, **rgw.env()}, check=False).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        rgw.stop()


def _cli_ensure_packages(args: argparse.Namespace) -> int:
    ensure_packages(log=_log_to_stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="action", required=True)

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("-v", "--verbose", action="store_true", help="log boot progress to stderr")
        return sub

    for name, handler, help_text in (
        ("start", _cli_start, "boot a detached cluster in DIR, write DIR/env.sh, print its exports"),
        ("exec", _cli_exec, "boot a cluster, run a command with its env, stop it, exit with its code"),
    ):
        sub = add(name, handler, help_text)
        sub.add_argument("--dir", required=True, type=Path, help="throwaway work directory (wiped)")
        sub.add_argument("--port", type=int, help="S3 port on 127.0.0.1 (default: a free one)")
        sub.add_argument("--timeout", type=float, default=90, help="seconds to wait for the boot")
        if name == "exec":
            sub.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    add("stop", _cli_stop, "stop the cluster started in DIR").add_argument("--dir", required=True, type=Path)
    add("ensure-packages", _cli_ensure_packages, "apt-get install the Ceph packages if missing")

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except RGWError as error:
        print(f"local_rgw: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
