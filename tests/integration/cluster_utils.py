"""A private Slurm cluster and two ssh hosts on this machine, started and removed by the tests.

Two "hosts" are two Linux network namespaces joined by a veth pair. Each host also gets its own UTS
namespace (hostname = its node name: slurmctld insists on it) and mount namespace (an /etc/hosts
naming both hosts, bind-mounted), entered with ``nsenter --net`` rather than ``ip netns exec``
(which remounts /sys without /sys/fs/cgroup, and slurmd 22.05 then refuses to start). Each host
runs sshd (private host key, key-only root login) and slurmd; the first also runs slurmctld.
munged runs in the root namespace with its own key and socket (a filesystem socket reaches both
namespaces).

Nothing touches a real installation: the cluster's slurm.conf is passed through SLURM_CONF, the
munge socket and key are private, the daemons listen only inside the namespaces, and ssh reads a
private config through ``-F`` (a two-line ``ssh`` wrapper first on PATH: OpenSSH reads
``~/.ssh/config`` from the passwd home, so this is the only way to leave a user's ssh set-up alone).

Missing Debian packages (slurmctld, slurmd, slurm-client, munge, openssh-server, pdsh) are
installed with apt-get when running as root; package scripts are kept from starting the system's
own daemons (a temporary /usr/sbin/policy-rc.d). ``Cluster.close`` removes everything started:
it cancels the jobs, kills every process left in the two namespaces (pids from ``ip netns pids``)
and munged (pid file), deletes the namespaces and the /etc/netns entries it made.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# binary -> Debian package
PACKAGES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "munged": "munge",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "pdsh": "pdsh",
}
SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
CTLD_PORT, SLURMD_PORT = 46817, 46818  # only ever bound inside the test's namespaces
# Job credentials live 10 s instead of Slurm's 120 s. A requeued job keeps its credential revoked
# until that credential expires; a job started again before then is killed by slurmd
# ("Job credential revoked", "Killing non-startable batch JobId") and ends FAILED. The requeue
# cycles wait this long before releasing the job.
CRED_EXPIRE_S = 10
NAMES = ("mgi-node1", "mgi-node2")
SUBNET = "10.78.{}.{}"


class InfraUnavailable(Exception):
    """The machine cannot host the cluster (not root, no namespaces, packages not installable)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def _run(
    cmd: list[str], timeout: float = 60, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-2000:]}"
        )
    return r


def missing_packages() -> list[str]:
    return sorted({pkg for exe, pkg in PACKAGES.items() if _which(exe) is None})


def ensure_packages() -> float:
    """apt-get install whatever is missing; returns the seconds it took (0 when nothing was)."""
    missing = missing_packages()
    if not missing:
        return 0.0
    if os.geteuid() != 0 or _which("apt-get") is None:
        raise InfraUnavailable(
            f"Debian packages {' '.join(missing)} are missing and cannot be installed "
            "(needs root and apt-get)"
        )
    t0 = time.time()
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if (
        made_policy
    ):  # keep the packages' scripts from starting the system's munged/sshd/slurm daemons
        policy.write_text(
            "#!/bin/sh\n# megapt infra tests: no daemon starts during apt-get install\nexit 101\n"
        )
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _run(["apt-get", "update", "-qq"], timeout=600, env=env)
        _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            timeout=900,
            env=env,
        )
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise InfraUnavailable(f"apt-get install {' '.join(missing)} failed: {exc}") from exc
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    still = missing_packages()
    if still:
        raise InfraUnavailable(f"still missing after apt-get install: {' '.join(still)}")
    return time.time() - t0


def unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "needs Linux (network namespaces)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd, sshd)"
    for tool in ("ip", "nsenter", "unshare", "mount", "hostname"):
        if _which(tool) is None:
            return f"'{tool}' not found (util-linux / iproute2)"
    if not missing_packages():
        return None
    if _which("apt-get") is None:
        return (
            f"Debian packages {' '.join(missing_packages())} missing and no apt-get to install them"
        )
    return None


def slurm_version() -> str:
    return _run([_which("slurmctld") or "slurmctld", "-V"], check=False).stdout.strip()


def tool_versions() -> dict:
    """What the tests actually ran against (printed into the test log, quoted in the README)."""
    ssh = _run([_which("ssh") or "ssh", "-V"], check=False)
    pdsh = _run([_which("pdsh") or "pdsh", "-V"], check=False)
    return {
        "slurm": slurm_version(),
        "openssh": (ssh.stderr or ssh.stdout).strip(),
        "pdsh": (pdsh.stdout or pdsh.stderr).strip().splitlines()[0]
        if (pdsh.stdout or pdsh.stderr)
        else "",
    }


@dataclass
class Job:
    id: str
    out: Path  # the job's Slurm log

    def text(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else f"<no {self.out}>"


@dataclass
class Cluster:
    base: Path
    tag: str
    ns: tuple[str, str] = ("", "")
    addrs: tuple[str, str] = ("", "")
    names: tuple[str, str] = NAMES
    env: dict = field(default_factory=dict)  # SLURM_CONF, PATH (ssh wrapper first)
    host_pids: list[int] = field(default_factory=list)  # one process per host to nsenter into
    _made: list[Path] = field(default_factory=list)  # /etc/netns entries etc. to remove
    _netns: list[str] = field(default_factory=list)
    _munged_pid: int | None = None

    # ---------------------------------------------------------------- running things on a host

    def on(self, host: int, cmd: list[str], cwd: Path | None = None) -> list[str]:
        """``cmd`` as run on ``host`` (its network, UTS and mount namespaces: name, /etc/hosts), in
        ``cwd`` (entering a mount namespace otherwise leaves the command in /)."""
        return [
            "nsenter",
            "-t",
            str(self.host_pids[host]),
            "-n",
            "-u",
            "-m",
            f"--wd={cwd or Path.cwd()}",
            *cmd,
        ]

    def run(
        self,
        cmd: list[str],
        host: int = 0,
        timeout: float = 60,
        check: bool = True,
        cwd: Path | None = None,
        env: dict | None = None,
    ) -> subprocess.CompletedProcess:
        return _run(self.on(host, cmd, cwd), timeout=timeout, check=check, env=env or self.env)

    # ---------------------------------------------------------------- Slurm

    def sbatch(
        self, script: str, args: list[str], cwd: Path, env: dict, opts: list[str] = ()
    ) -> Job:
        """``sbatch [opts] script args`` on the first host, from ``cwd`` (``script`` is relative)."""
        r = self.run(["sbatch", "--parsable", *opts, script, *args], cwd=cwd, env=env)
        jid = r.stdout.strip().split(";")[0]
        name = re.search(r"^#SBATCH --job-name=(\S+)", (cwd / script).read_text(), re.M)
        return Job(jid, cwd / "logs" / f"{name.group(1) if name else Path(script).name}-{jid}.out")

    def job(self, jid: str) -> dict:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, RunTime...)."""
        r = self.run(["scontrol", "-o", "show", "job", jid], check=False)
        out = r.stdout
        return {k: v for k, v in re.findall(r"(\w+)=(\S*)", out)} if r.returncode == 0 else {}

    def wait_job(self, jid: str, pred, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        while True:
            info = self.job(jid)
            if info and pred(info):
                return info
            if time.time() > deadline:
                raise TimeoutError(
                    f"job {jid}: not {what} within {timeout:.0f}s; last state {info}"
                )
            time.sleep(0.5)

    def update(self, jid: str, **fields: str) -> None:
        self.run(["scontrol", "update", f"JobId={jid}", *(f"{k}={v}" for k, v in fields.items())])

    # ---------------------------------------------------------------- set-up

    def start(self) -> Cluster:
        self.base.mkdir(parents=True, exist_ok=True)
        self._namespaces()
        self._ssh_keys()
        self._munge()
        self._slurm_conf()
        for i in (0, 1):
            self._start_host(i)
        self._wait_idle()
        self._check_ssh()
        return self

    def _namespaces(self) -> None:
        self.ns = (f"mgi{self.tag}a", f"mgi{self.tag}b")
        octet = int(self.tag) % 250 + 1
        self.addrs = (SUBNET.format(octet, 1), SUBNET.format(octet, 2))
        veth = (f"mgv{self.tag}a", f"mgv{self.tag}b")
        for n in self.ns:
            _run(["ip", "netns", "add", n])
            self._netns.append(n)
        _run(["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]])
        for n, v, addr in zip(self.ns, veth, self.addrs):
            _run(["ip", "link", "set", v, "netns", n])
            _run(["ip", "-n", n, "link", "set", v, "name", "mgi0"])
            _run(["ip", "-n", n, "addr", "add", f"{addr}/24", "dev", "mgi0"])
            _run(["ip", "-n", n, "link", "set", "mgi0", "up"])
            _run(["ip", "-n", n, "link", "set", "lo", "up"])
        etc = Path("/etc/netns")
        if not etc.exists():
            etc.mkdir()
            self._made.append(etc)
        hosts = [
            line
            for line in Path("/etc/hosts").read_text().splitlines()
            if not line.strip().endswith(NAMES)
        ]
        hosts += [f"{a} {n}" for a, n in zip(self.addrs, self.names)]
        for n in self.ns:
            d = etc / n
            d.mkdir()
            self._made.insert(0, d)
            (d / "hosts").write_text("\n".join(hosts) + "\n")

    def _ssh_keys(self) -> None:
        b = self.base / "ssh"
        b.mkdir(mode=0o700)
        for key in ("id_ed25519", "host_ed25519"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(b / key)])
        shutil.copy(b / "id_ed25519.pub", b / "authorized_keys")
        (b / "ssh_config").write_text(
            f"Host *\n    User root\n    IdentityFile {b}/id_ed25519\n    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {b}/known_hosts\n    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking accept-new\n    BatchMode yes\n    ConnectTimeout 10\n"
            "    LogLevel ERROR\n"
        )
        bindir = self.base / "bin"
        bindir.mkdir()
        wrapper = bindir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {_which("ssh")} -F {b}/ssh_config "$@"\n')
        wrapper.chmod(0o755)
        for i, addr in enumerate(self.addrs):
            (b / f"sshd_config-{i}").write_text(
                f"ListenAddress {addr}\nPort 22\nHostKey {b}/host_ed25519\n"
                f"AuthorizedKeysFile {b}/authorized_keys\nPermitRootLogin prohibit-password\n"
                f"PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                f"UsePAM no\nStrictModes no\nPidFile {b}/sshd-{i}.pid\n"
            )
        privsep = Path("/run/sshd")
        if not privsep.exists():
            privsep.mkdir(mode=0o755, parents=True)
            self._made.append(privsep)

    def _munge(self) -> None:
        m = self.base / "munge"
        m.mkdir(mode=0o700)
        key = m / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        _run(
            [
                "munged",
                "--force",
                f"--socket={m}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/seed",
            ]
        )
        self._munged_pid = int((m / "munged.pid").read_text().split()[0])

    def _slurm_conf(self) -> None:
        s = self.base / "slurm"
        for d in ("state", "spool", "log", "run"):
            (s / d).mkdir(parents=True)
        cpus = os.sysconf("SC_NPROCESSORS_ONLN")  # not nproc: it honours OMP_NUM_THREADS
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={a} CPUs={cpus} State=UNKNOWN"
            for n, a in zip(self.names, self.addrs)
        )
        (s / "slurm.conf").write_text(f"""\
ClusterName=megaptci{self.tag}
SlurmctldHost={self.names[0]}({self.addrs[0]})
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.base}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool/%n
SlurmctldPidFile={s}/run/slurmctld.pid
SlurmdPidFile={s}/run/slurmd-%n.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
{nodes}
PartitionName=ci Nodes={",".join(self.names)} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = dict(
            os.environ,
            SLURM_CONF=str(s / "slurm.conf"),
            PATH=f"{self.base / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        )

    def _start_host(self, i: int) -> None:
        s = self.base / "slurm"
        conf = s / "slurm.conf"
        daemons = [
            f"/usr/sbin/sshd -f {self.base}/ssh/sshd_config-{i} -E {self.base}/ssh/sshd-{i}.log"
        ]
        if i == 0:
            daemons.append(f"{_which('slurmctld')} -f {conf}")
        daemons.append(f"{_which('slurmd')} -f {conf} -N {self.names[i]}")
        script = (
            f"mount --bind /etc/netns/{self.ns[i]}/hosts /etc/hosts && hostname {self.names[i]} && "
            + " && ".join(daemons)
        )
        _run(
            [
                "nsenter",
                f"--net=/run/netns/{self.ns[i]}",
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            env=self.env,
            timeout=60,
        )
        pidfile = s / "run" / f"slurmd-{self.names[i]}.pid"
        for _ in range(100):
            if pidfile.is_file() and pidfile.read_text().strip():
                break
            time.sleep(0.1)
        self.host_pids.append(int(pidfile.read_text().split()[0]))

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%D %t"], check=False).stdout.strip()
            if out == "2 idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster did not come up (sinfo: {out!r}):\n{self.logs()}")

    def _check_ssh(self) -> None:
        for i in (0, 1):
            for name in self.names:
                r = self.run(["ssh", name, "hostname"], host=i, check=False, timeout=30)
                if r.returncode or r.stdout.strip() != name:
                    raise RuntimeError(
                        f"ssh {name} from {self.names[i]} failed: {r.stdout}{r.stderr}\n"
                        + self.logs()
                    )

    def logs(self, n: int = 2000) -> str:
        parts = []
        for p in sorted((self.base / "slurm" / "log").glob("*.log")) + sorted(
            (self.base / "ssh").glob("*.log")
        ):
            parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        """Remove everything ``start`` made; never raises (it runs after failures too)."""
        if self.host_pids:
            with contextlib.suppress(Exception):
                self.run(["scancel", "--full", "--quiet", "-u", "root"], check=False, timeout=30)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = self._pids_in_namespaces()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + wait
            while pids and time.time() < deadline:
                pids = self._pids_in_namespaces()
                time.sleep(0.2)
        if self._munged_pid:
            with contextlib.suppress(ProcessLookupError):
                if Path(f"/proc/{self._munged_pid}/comm").read_text().strip() == "munged":
                    os.kill(self._munged_pid, signal.SIGTERM)
        for n in self._netns:
            subprocess.run(["ip", "netns", "delete", n], capture_output=True, timeout=30)
        for v in (f"mgv{self.tag}a", f"mgv{self.tag}b"):  # a veth whose move failed
            if subprocess.run(["ip", "link", "show", v], capture_output=True).returncode == 0:
                subprocess.run(["ip", "link", "delete", v], capture_output=True, timeout=30)
        for p in self._made:
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.name != "netns" else p.rmdir()

    def _pids_in_namespaces(self) -> list[int]:
        pids: list[int] = []
        for n in self._netns:
            r = subprocess.run(
                ["ip", "netns", "pids", n], capture_output=True, text=True, timeout=30
            )
            pids += [int(x) for x in r.stdout.split() if x.isdigit()]
        return pids


@contextlib.contextmanager
def cluster(base: Path):
    """Start the cluster under ``base``; always remove it. Raises InfraUnavailable (-> skip)."""
    reason = unavailable_reason()
    if reason:
        raise InfraUnavailable(reason)
    ensure_packages()
    c = Cluster(base=base, tag=f"{os.getpid() % 100000}")
    try:
        yield c.start()
    finally:
        c.close()
