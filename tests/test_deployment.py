"""The Deployment Engine for real: SuperNode authentication over TLS and a SuperLink
restarted under a run (one federation for both), and a SuperLink and SuperNodes on two
network hosts (network namespaces the test makes).

Both use the documented commands (TLS, SuperNode authentication, a SuperLink `--database`,
SuperNodes that retry) on the tiny shards of conftest's data_dir. Marked slow.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import FLWR, REPO, free_port, records, supernode_key

pytestmark = pytest.mark.slow

BIN = pathlib.Path(sys.executable).parent
# Settings of the run: two SuperNodes, short local training.
RUN_CONFIG = "min-clients=2 local-epochs=1 batch-size=32"


def superlink_cmd(certs: pathlib.Path, database: pathlib.Path, port: int,
                  host: str = "127.0.0.1") -> list[str]:
    """The documented SuperLink command: TLS, SuperNode authentication, state in database."""
    return [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--database", str(database), "--host", host,
            "--port", str(port), "--disable-runtime-dependency-installation"]


def supernode_cmd(certs: pathlib.Path, key: pathlib.Path, superlink: str, port: int,
                  partition: int, data: pathlib.Path) -> list[str]:
    """The documented SuperNode command: TLS and its key. Flower's default retry policy
    (no --max-retries, no --max-wait-time: retry without limit, backing off) carries it
    over a SuperLink restart."""
    return [str(BIN / "flower-supernode"), "--superlink", superlink,
            "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(key),
            "--port", str(port),
            "--node-config", f"partition-id={partition} data-dir='{data}'"]


class Group:
    """Processes in sessions of their own; kill() ends each whole session and whatever
    Flower started detached (flower-superexec and the flwr-serverapp it runs)."""

    def __init__(self, log_dir: pathlib.Path, env: dict) -> None:
        self.log_dir, self.env = log_dir, env
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: set[psutil.Process] = set()

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True)
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def note_descendants(self) -> None:
        """Remember the children of every process (they may leave the session)."""
        for proc in self.procs.values():
            try:
                self.seen.update(psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass

    def kill(self, name: str) -> list[psutil.Process]:
        """SIGKILL one process's whole session -> its descendants as they were (Flower's
        detached ones, e.g. flower-superexec, outlive the session for a while)."""
        self.note_descendants()
        proc = self.procs[name]
        try:
            orphans = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            orphans = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return orphans

    def kill_all(self) -> None:
        """SIGKILL every session and every descendant ever seen; wait until all are gone."""
        self.note_descendants()
        for name in self.procs:
            self.kill(name)
        for child in self.seen:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(self.seen), timeout=10)


def wait_for(condition, timeout: float, what: str, group: Group) -> None:
    """Poll condition() every 0.3 s; fail with every log's tail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{group.log(n)[-3000:]}" for n in group.procs)
            pytest.fail(f"{what}: not after {timeout} s\n{logs}")
        time.sleep(0.3)


def rounds_saved(results: pathlib.Path) -> list[int]:
    try:
        return [r["round"] for r in records(results)]
    except (FileNotFoundError, ValueError):  # not yet, or being replaced right now
        return []


def run_status(env: dict, run_id: str) -> tuple[str, str]:
    """(status, status-details) of a run, from `flwr ls`; ("", reason) while unreachable."""
    done = subprocess.run([FLWR, "ls", "--format", "json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    try:
        run = next(r for r in json.loads(done.stdout)["runs"] if r["run-id"] == run_id)
    except (ValueError, KeyError, StopIteration):
        return "", done.stdout + done.stderr
    return run["status"], run["status-details"]


def start_run(env: dict, settings: str) -> str:
    """`flwr run .` (not streamed: the stream would end with the SuperLink) -> its run id."""
    done = subprocess.run([FLWR, "run", ".", "--run-config", f"{RUN_CONFIG} {settings}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return next(line.split()[-1] for line in done.stdout.splitlines()
                if line.startswith("Successfully started run"))


def deployment(tmp_path: pathlib.Path, host: str, port: int,
               supernodes: int = 2) -> tuple[pathlib.Path, dict]:
    """Certificates for host, a FLWR_HOME that points `flwr` at host:port, SuperNode key
    pairs (tmp_path/supernode_0 ...) -> (certificate dir, environment for every command)."""
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, str(REPO / "make_certificates.py"), "--out-dir", str(certs),
                    "--host", host], check=True, capture_output=True, timeout=60)
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
        f'address = "{host}:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n')
    for i in range(supernodes):
        supernode_key(tmp_path / f"supernode_{i}")
    return certs, {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                   "PYTHONUNBUFFERED": "1",
                   "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def register_supernodes(tmp_path: pathlib.Path, env: dict, group: Group,
                        prefix: tuple[str, ...] = ()) -> None:
    """`flwr supernode register` both public keys (run after prefix, e.g. `ip netns exec
    NS`), retried until the SuperLink is up."""
    for i in (0, 1):
        register = [*prefix, FLWR, "supernode", "register", str(tmp_path / f"supernode_{i}.pub")]
        wait_for(lambda: subprocess.run(register, cwd=REPO, env=env, capture_output=True,
                                        timeout=60).returncode == 0, 60,
                 "the SuperLink accepting registrations", group)


def test_only_registered_supernodes_join_and_a_superlink_restart_under_a_run(
        data_dir, tmp_path):
    """SuperLink with TLS and SuperNode authentication: of three SuperNodes, the one whose
    key is not registered is refused; the two registered ones train. SIGKILL the SuperLink
    after round 1 of 2 and start it again with the same command.

    The SuperNodes keep running and reconnect (no 401, no traceback: their registrations
    are in the database). Flower ends the run, whose ServerApp died with the SuperLink,
    as failed; `resume=true` (streamed, as the docs run it) continues it from round 1 with
    both nodes. One federation for both checks: each alone costs a SuperLink, SuperNodes
    and a run.
    """
    port = free_port()
    certs, env = deployment(tmp_path, "127.0.0.1", port, supernodes=3)
    group = Group(tmp_path / "logs", env)
    link = superlink_cmd(certs, tmp_path / "state.db", port)
    results = tmp_path / "results"
    settings = f"num-server-rounds=2 results-dir='{results}' data-dir='{data_dir}'"
    try:
        group.start("superlink", link)
        register_supernodes(tmp_path, env, group)  # supernode_0 and _1, not supernode_2
        for i, partition in ((0, 0), (1, 1), (2, 0)):
            group.start(f"supernode_{i}", supernode_cmd(
                certs, tmp_path / f"supernode_{i}", f"127.0.0.1:{port}", free_port(),
                partition, data_dir))
        run_id = start_run(env, settings)
        wait_for(lambda: group.procs["supernode_2"].poll() is not None, 60,
                 "the unregistered SuperNode refused", group)
        assert group.procs["supernode_2"].returncode != 0
        assert "Failed to activate SuperNode" in group.log("supernode_2")
        wait_for(lambda: 1 in rounds_saved(results), 120, "round 1 saved", group)
        round_1 = records(results)[1]
        orphans = group.kill("superlink")
        group.start("superlink", link)
        wait_for(lambda: run_status(env, run_id)[0].startswith("finished"), 120,
                 "the interrupted run ended", group)
        assert run_status(env, run_id)[0] == "finished:failed"
        # The killed SuperLink's flower-superexec and flwr-serverapp end by themselves
        # (each watches its parent): nothing of the old run writes into results.
        _, alive = psutil.wait_procs(orphans, timeout=60)
        assert alive == [], [p.cmdline()[:2] for p in alive]
        done = subprocess.run(
            [FLWR, "run", ".", "--stream", "--run-config", f"{RUN_CONFIG} {settings} resume=true"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        resumed = next(line.split()[-1] for line in (done.stdout + done.stderr).splitlines()
                       if line.startswith("Successfully started run"))
        assert run_status(env, resumed)[0] == "finished:completed", run_status(env, resumed)
        for i in (0, 1):  # the same SuperNode processes, reconnected
            assert group.procs[f"supernode_{i}"].poll() is None, group.log(f"supernode_{i}")
            assert "Traceback" not in group.log(f"supernode_{i}"), group.log(f"supernode_{i}")
    finally:
        group.kill_all()
    recs = records(results)
    assert [(r["round"], r["clients_fit"], r["failures"]) for r in recs] == [
        (0, 0, 0), (1, 2, 0), (2, 2, 0)]
    assert recs[1] == round_1  # resumed from round 1, not started over


# ------------------------------------------------------------ across two network hosts

SUPERLINK_IP, SUPERNODE_IP = "10.200.0.1", "10.200.0.2"  # only inside the namespaces below


def ip(*args: str) -> subprocess.CompletedProcess:
    """Run iproute2's `ip args`, output captured."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: the SuperLink's host (10.200.0.1) and
    the SuperNodes' (10.200.0.2), each with its own loopback. Yields the two `ip netns
    exec` prefixes; the namespaces (and whatever still runs in them) are removed after.
    Skips where namespaces cannot be made: no iproute2, not root, or no permission
    (a container without CAP_SYS_ADMIN)."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` (apt-get install iproute2) for network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    tag = f"{os.getpid() % 100000}"
    link_ns, node_ns = f"fljax-link-{tag}", f"fljax-node-{tag}"
    link_if, node_if = f"fjl{tag}", f"fjn{tag}"  # interface names: at most 15 characters
    made = []
    try:
        for ns in (link_ns, node_ns):
            done = ip("netns", "add", ns)
            if done.returncode != 0:
                pytest.skip(f"`ip netns add` is not allowed here: {done.stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", link_if, "type", "veth", "peer", "name", node_if),
                 ("link", "set", link_if, "netns", link_ns),
                 ("link", "set", node_if, "netns", node_ns)]
        for ns, dev, addr in ((link_ns, link_if, SUPERLINK_IP), (node_ns, node_if, SUPERNODE_IP)):
            steps += [("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                      ("-n", ns, "link", "set", dev, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            done = ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield (["ip", "netns", "exec", link_ns], ["ip", "netns", "exec", node_ns])
    finally:
        for ns in made:  # end what still runs there, then the namespace (and its veth end)
            for pid in ip("netns", "pids", ns).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "delete", ns)


def test_deployment_engine_across_two_network_hosts(data_dir, tmp_path, two_hosts):
    """The documented commands with the SuperLink on one host and two SuperNodes on another,
    over TLS with a certificate for the SuperLink's address and SuperNode authentication:
    one round, both partitions."""
    on_link, on_nodes = two_hosts
    port = 9000  # each namespace has its own ports: nothing else listens there
    certs, env = deployment(tmp_path, SUPERLINK_IP, port)
    group = Group(tmp_path / "logs", env)
    results = tmp_path / "results"
    try:
        group.start("superlink", [*on_link, *superlink_cmd(certs, tmp_path / "state.db", port,
                                                           host=SUPERLINK_IP)])
        register_supernodes(tmp_path, env, group, prefix=tuple(on_nodes))  # across the veth
        for i in (0, 1):
            group.start(f"supernode_{i}", [*on_nodes, *supernode_cmd(
                certs, tmp_path / f"supernode_{i}", f"{SUPERLINK_IP}:{port}", 9094 + i, i,
                data_dir)])
        done = subprocess.run(
            [*on_nodes, FLWR, "run", ".", "--stream", "--run-config",
             f"{RUN_CONFIG} num-server-rounds=1 results-dir='{results}' data-dir='{data_dir}'"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "round 1/1  accuracy" in done.stdout + done.stderr
    finally:
        group.kill_all()
    recs = records(results)
    assert [(r["round"], r["clients_fit"], r["failures"]) for r in recs] == [
        (0, 0, 0), (1, 2, 0)]
    assert recs[-1]["centralized_accuracy"] > 0.3  # it learned (chance is 0.1)
