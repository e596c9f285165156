"""Starting a stage on several processes with torchrun, and reporting its failure in one line.

When ``params.yaml`` asks for more than one process, the ``pretrain`` and ``embed`` stages
re-run themselves as ``python -m torch.distributed.run ... -m stages.<name> --worker`` (the
module torchrun runs; the same interpreter, so the project's venv) and wait for it, so that
``dvc repro`` and the Prefect flow need no other command:

- one machine: ``--standalone`` (a private rendezvous on a free local port);
- several machines: this machine is node 0 and hosts the rendezvous at ``host:port``
  (torchrun's static rendezvous: ``--node-rank 0 --master-addr host --master-port port``),
  so global rank 0, the process that writes the outputs, runs where ``dvc repro`` runs. The
  other machines join with the same command and their own ``--node-rank``
  (:func:`node_command`, docs/distributed.md). Waiting for them, and reaching ``host:port``,
  are bounded by ``--rdzv-conf timeout=<s>``.

A killed stage takes its processes with it: torchrun gets SIGTERM when the stage dies, and
each worker SIGKILL when torchrun dies (Linux ``PR_SET_PDEATHSIG``, :func:`die_with_parent`;
torchrun starts workers in their own sessions, out of reach of a signal to the stage's
process group), so no orphan keeps training and writing after a kill.

The children's output (stdout and stderr, merged) is copied to this process's stdout as it
comes, so progress and tracebacks show in the DVC log. On failure :func:`run_torchrun`
returns the first line that explains it: a worker's own ``error: <line>`` (bad input, exit
2), else the last ``SomeError: message`` line of a traceback (a rendezvous that timed out,
a crash), so the stage can print one line and exit non-zero.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from leo.utils.errors import LeoInputError

ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<name>[A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_RANK_PREFIX = re.compile(r"^\[(?:default)?rank\d+\]:\s?")  # torch's prefix on workers' tracebacks
RENDEZVOUS_ERRORS = ("DistStoreError", "DistNetworkError", "RendezvousTimeoutError")


@dataclass(frozen=True)
class Launch:
    """How torchrun starts a stage.

    Attributes:
        module: the stage module, e.g. ``stages.pretrain`` (run with ``--worker``).
        processes_per_node: processes on each machine (one per GPU).
        nodes: machines.
        endpoint: ``host:port`` of node 0's rendezvous (used when ``nodes > 1``).
        timeout_s: how long the rendezvous may take (joining, connecting).
    """

    module: str
    processes_per_node: int
    nodes: int = 1
    endpoint: str = "localhost:29500"
    timeout_s: float = 300.0

    @property
    def world_size(self) -> int:
        """Processes in all."""
        return self.processes_per_node * self.nodes


def split_endpoint(endpoint: str, what: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; IPv6 hosts in brackets.

    Raises:
        LeoInputError: not ``host:port`` or a port outside 1-65535, naming ``what``.
    """
    m = ENDPOINT.match(endpoint)
    port = int(m["port"]) if m else 0
    if not m or not 1 <= port <= 65535:
        raise LeoInputError(f"{what}: must be host:port with a port in 1-65535 (got {endpoint!r})")
    return m["host"].strip("[]"), port


def node_command(launch: Launch, node_rank: int, python: str = sys.executable) -> list[str]:
    """The torchrun command line of machine ``node_rank`` (0: the one that runs the stage)."""
    cmd = [python, "-m", "torch.distributed.run"]
    cmd += ["--nproc-per-node", str(launch.processes_per_node)]
    if launch.nodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        host, port = split_endpoint(launch.endpoint, "rendezvous endpoint")
        cmd += [
            "--nnodes", str(launch.nodes), "--node-rank", str(node_rank),
            "--master-addr", host, "--master-port", str(port),
            "--rdzv-conf", f"timeout={max(1, round(launch.timeout_s))}",
        ]  # fmt: skip
    return [*cmd, "--max-restarts", "0", "-m", launch.module, "--worker"]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux only; a
    no-op elsewhere); exit at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(1)


def first_error(lines: Iterable[str]) -> tuple[str | None, bool]:
    """The line that explains a failed torchrun run, and whether a worker wrote it.

    Returns:
        ``(line, from_worker)``: the first ``error: <line>`` of a worker (``<line>``, True),
        else the last ``module.SomeError: message`` line (``SomeError: message``, False),
        else ``(None, False)``. torch's ``[rank<i>]:`` prefixes are ignored.
    """
    last = None
    for raw in lines:
        line = _RANK_PREFIX.sub("", raw.strip())
        if line.startswith("error: "):
            return line.removeprefix("error: "), True
        m = _EXCEPTION.match(line)
        if m and m["name"] != "ChildFailedError":
            last = f"{m['name']}: {m.group(2)}"
    return last, False


def run_torchrun(launch: Launch, what: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run node 0's torchrun and wait; relay its output to stdout.

    Args:
        launch: the command's settings.
        what: the params key prefix for messages, e.g. ``"params.yaml: pretrain"``.
        env: the children's environment (default: this one); ``OMP_NUM_THREADS`` defaults to
            1 (torchrun would set it too, with a warning).

    Returns:
        ``(exit code, error line)``: ``(0, "")`` on success; on failure a non-zero code (2
        when a worker refused its input, as a stage does) and one line saying why.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = node_command(launch, 0)
    print(f"{what}: {launch.world_size} processes: {' '.join(cmd[1:])}", flush=True)
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    ) as proc:
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    if proc.returncode == 0:
        return 0, ""
    line, from_worker = first_error(lines)
    if from_worker:
        return 2, line
    code = proc.returncode if proc.returncode > 0 else 1
    if line and line.split(":", 1)[0] in RENDEZVOUS_ERRORS and launch.nodes > 1:
        return code, (
            f"{what}.rdzv_endpoint: no rendezvous of {launch.nodes} machines at "
            f"{launch.endpoint} within {launch.timeout_s:g} s ({line})"
        )
    reason = line or f"exit code {proc.returncode}, see the output above"
    return code, f"{what}: torchrun with {launch.world_size} processes failed: {reason}"
