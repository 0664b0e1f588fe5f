"""A real ssh-reachable node on this machine, for testing the Ray cluster launcher as users run it.

- `ensure_packages()` installs openssh-server and rsync with apt-get if they are missing (the
  launcher needs rsync, and sshd to reach a node), without starting any system service;
- `NodeUser` is a fresh unprivileged user with a key pair, this machine's pip configuration (so its
  venv finds the same local wheels), and a Ray temp folder of its own: everything the cluster
  runs on the node runs as this user, so it cannot signal any process it did not start;
- `Sshd` is an sshd of our own, bound to 127.0.0.1 on a free port, stopped by its process id;
- `launcher_env()` runs `ray up` & co. with an `ssh` wrapper first on PATH that points ssh at that
  port (Ray 2.60 has no ssh port setting), a home folder of their own (the token the launcher
  copies to the nodes) and temp folders of their own (the launcher's cluster state).

Nothing here ends a process by name: only by the ids this module started, or the processes of the
user it created.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

BIN = Path(sys.executable).parent


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)


def ensure_packages() -> list[str]:
    """apt-get install openssh-server / rsync where missing; returns what was installed. Service
    starts are refused for the duration (policy-rc.d), so no system sshd is started."""
    missing = [pkg for pkg, exe in (("openssh-server", "/usr/sbin/sshd"), ("rsync", "rsync"), ("openssh-client", "ssh-keygen"))
               if not shutil.which(exe)]
    if not missing:
        return []
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], env=env, timeout=600)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, timeout=900)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pip_config_lines() -> list[str]:
    """This machine's effective pip configuration (files and PIP_* variables) as pip.conf lines:
    on the build machines it points pip at the local wheels (CPU torch among them)."""
    out = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    settings: dict[str, str] = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if not key or section not in ("global", "install", ":env:"):
            continue
        settings[key] = value.strip().strip("'\"")
    # The build machines resolve no name but the registries': without this, every package that
    # `pip install torch==X+cpu --extra-index-url https://download.pytorch.org/whl/cpu` looks up
    # waits through five retries of a failed name lookup.
    settings.setdefault("retries", "1")
    # Byte-compiling every file of a 2.5 GB install costs minutes on two cores; Python compiles
    # what it imports on first use instead (the venv belongs to the user who runs it).
    settings.setdefault("no-compile", "true")
    return ["[global]", *(f"{k} = {v}" for k, v in settings.items())]


class NodeUser:
    """A user created for one test and deleted after it (home folder included)."""

    def __init__(self, root: Path):
        self.name = "avt" + secrets.token_hex(3)
        self.root = root
        run(["useradd", "--create-home", "--shell", "/bin/bash", self.name])
        run(["usermod", "-p", "*", self.name])  # no password, but not a locked account (sshd refuses those)
        pw = pwd.getpwnam(self.name)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, Path(pw.pw_dir)
        # The client key (root's side) and its public half in the user's authorized_keys.
        self.key = root / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(self.key)])
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        pip_dir = self.home / ".config" / "pip"
        pip_dir.mkdir(parents=True, exist_ok=True)
        (pip_dir / "pip.conf").write_text("\n".join(pip_config_lines()) + "\n")
        # Ray's temp folder: its own, not the machine's /tmp/ray (other users' Ray runtimes live there).
        self.ray_tmp = root / "u"
        self.ray_tmp.mkdir(mode=0o700)
        bashrc = self.home / ".bashrc"
        bashrc.write_text(f"export RAY_TMPDIR={self.ray_tmp}\n" + (bashrc.read_text() if bashrc.exists() else ""))
        for path in [self.ray_tmp, *self.home.rglob("*"), self.home]:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def processes(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["uids", "status"]):
            try:
                if p.info["uids"] and p.info["uids"].real == self.uid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def kill_all(self) -> list[str]:
        """SIGKILL what is left of this user's processes (all of them were started for the test)."""
        left = []
        for p in self.processes():
            try:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:150]}")
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(self.processes(), timeout=10)
        return left

    def delete(self) -> None:
        self.kill_all()
        run(["userdel", "--remove", self.name], check=False)
        shutil.rmtree(self.home, ignore_errors=True)


class Sshd:
    """sshd -D on 127.0.0.1:port, accepting only the node user with its key."""

    def __init__(self, root: Path, user: NodeUser):
        self.root, self.user = root, user
        self.port = free_port()
        self.host_key = root / "ssh_host_ed25519_key"
        self.config = root / "sshd_config"
        self.log = root / "sshd.log"
        self.proc: Optional[subprocess.Popen] = None
        self.made_privsep_dir = False

    def start(self) -> "Sshd":
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)])
        self.config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin no",
            f"AllowUsers {self.user.name}",
            "AllowTcpForwarding local",
            "X11Forwarding no",
            "PrintMotd no",
            "UseDNS no",
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            "LogLevel VERBOSE",
        ]) + "\n")
        privsep = Path("/run/sshd")
        if not privsep.exists():
            privsep.mkdir(mode=0o755, parents=True)
            self.made_privsep_dir = True
        run(["/usr/sbin/sshd", "-t", "-f", str(self.config)])
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(self.config), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"sshd did not start: {self.log.read_text() if self.log.exists() else ''}")
                time.sleep(0.2)

    def sessions(self) -> list[psutil.Process]:
        """The per-connection sshd processes of this sshd."""
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.made_privsep_dir:
            try:
                Path("/run/sshd").rmdir()
            except OSError:
                pass


def launcher_env(root: Path, sshd: Sshd) -> dict[str, str]:
    """Environment of the `ray up / submit / exec / dashboard / job submit / down` commands."""
    wrapper_dir = root / "bin"
    wrapper_dir.mkdir(exist_ok=True)
    ssh_config = root / "ssh_config"
    ssh_config.write_text(f"Host 127.0.0.1\n  Port {sshd.port}\n  HostKeyAlias avssl-test-node\n")
    # Options given first win over the ones Ray passes: our port, and a ControlPath in our folder, so
    # the launcher's background ssh master connections can be told from anyone else's.
    wrapper = wrapper_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {ssh_config} -o ControlPath={root}/cm-%C "$@"\n')
    wrapper.chmod(0o755)
    home, tmp = root / "home", root / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "PATH": f"{wrapper_dir}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "RAY_TMPDIR": str(tmp),
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def mux_masters(root: Path) -> list[psutil.Process]:
    """The launcher's background ssh master connections (ControlPersist), recognised by our ControlPath."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if f"{root}/cm-" in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            continue
    return out


def wait_until(predicate, timeout: float, interval: float = 0.5):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value or time.time() > deadline:
            return value
        time.sleep(interval)
