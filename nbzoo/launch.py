"""One launcher for every training notebook: its training on several devices (and machines)
under torchrun (``torch.distributed.run``), the notebook continuing from what rank 0 wrote.

A notebook's knobs ``devices`` (processes on this machine, one per device), ``nnodes``,
``node_rank``, ``master_addr`` and ``master_port`` (several machines) become torchrun's
arguments. Every rank runs the backend's training entry point (``module:function``, called as
``function(cfg, rt, **kwargs)``) on its shard of the data: :func:`nbzoo.train.fit` shards each
epoch's permutation across ranks and wraps the model in DistributedDataParallel, and
:func:`nbzoo.device.setup` joins the process group (gloo on a CPU, nccl on CUDA, hccl on an
NPU). ``batch_size`` stays per device, so the global batch is ``batch_size × devices × nnodes ×
grad_accum`` (:func:`global_batch`), as in the seeds' 8-device scripts with ``grad_accum`` 1; a
machine with fewer devices reaches the same global batch with a larger ``grad_accum``. Rank 0
writes the checkpoint and a JSON record of the run, which :func:`run` returns to the notebook.

Run in the notebook's process, not torchrun's: the notebook keeps its plots and widgets, and
the ranks are separate processes as on a real 8-device machine. On a machine with
``node_rank > 0`` the notebook launches its ranks and stops with :class:`OtherNode` once they
are done: node 0 writes the results.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbzoo import lifeline, safe_write

KNOBS = ("devices", "nnodes", "node_rank", "master_addr", "master_port", "rendezvous_timeout")
RESOLVE_SECONDS = 10.0  # the longest a name lookup of master_addr may take before we give up
MODES = ("train", "eval")


class OtherNode(RuntimeError):
    """This machine's ranks finished; node 0 writes the checkpoint and the results."""


class RendezvousError(RuntimeError):
    """The machines of a several-machine run did not meet (no node 0, a wrong address or port)."""


@dataclass(frozen=True)
class Launch:
    devices: int = 1  # processes on this machine, one per device
    nnodes: int = 1  # machines
    node_rank: int = 0  # this machine's index, 0 .. nnodes - 1 (node 0 writes the results)
    master_addr: str = "127.0.0.1"  # node 0's address, reachable from every machine
    master_port: int = 29500  # a free TCP port on node 0
    rendezvous_timeout: int = 300  # seconds the machines wait for each other before giving up

    def __post_init__(self):
        for name in ("devices", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank must be an integer from 0 to nnodes - 1 = {self.nnodes - 1}; "
                f"got {self.node_rank!r}"
            )
        if not isinstance(self.master_port, int) or not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be a TCP port (1..65535); got {self.master_port!r}")
        if not self.master_addr:
            raise ValueError("master_addr must name node 0 (a host name or an IP address)")
        if (
            isinstance(self.rendezvous_timeout, bool)
            or not isinstance(self.rendezvous_timeout, int)
            or self.rendezvous_timeout < 1
        ):
            raise ValueError(
                f"rendezvous_timeout must be a whole number of seconds >= 1; "
                f"got {self.rendezvous_timeout!r}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Launch:
        return cls(**{k: cfg[k] for k in KNOBS if cfg.get(k) is not None})

    @property
    def world_size(self) -> int:
        return self.devices * self.nnodes

    def torchrun_args(self) -> list[str]:
        """torchrun's options. One machine: ``--standalone`` (a free local port, so that two jobs
        on one machine never collide); several: the static rendezvous at master_addr:port."""
        args = [f"--nproc_per_node={self.devices}"]
        if self.nnodes == 1:
            return [*args, "--standalone"]
        return [
            *args,
            f"--nnodes={self.nnodes}",
            f"--node_rank={self.node_rank}",
            f"--master_addr={self.master_addr}",
            f"--master_port={self.master_port}",
            # the static rendezvous's TCPStore: how long node 0 waits for the others, and they
            # for node 0 (torchrun's default, 600 s, passes in silence)
            f"--rdzv_conf=timeout={self.rendezvous_timeout}",
        ]

    def waiting_for(self) -> str:
        """What this machine waits for, in words (printed before torchrun starts)."""
        where = f"{self.master_addr}:{self.master_port} (master_addr:master_port)"
        if self.node_rank == 0:
            others = self.nnodes - 1
            return (
                f"node 0 of {self.nnodes}: listening at {where} for the other {others} "
                f"machine{'s' if others > 1 else ''}, up to {self.rendezvous_timeout} s "
                "(rendezvous_timeout)"
            )
        return (
            f"node {self.node_rank} of {self.nnodes}: connecting to node 0 at {where}, up to "
            f"{self.rendezvous_timeout} s (rendezvous_timeout)"
        )

    def resolve_master(self, seconds: float = RESOLVE_SECONDS) -> None:
        """Look ``master_addr`` up before torchrun starts (which would retry an unknown name in
        silence for minutes); raise :class:`RendezvousError` naming it when it does not
        resolve within ``seconds``."""
        import socket
        import threading

        outcome: list[BaseException | None] = []

        def lookup() -> None:
            try:
                socket.getaddrinfo(self.master_addr, self.master_port, type=socket.SOCK_STREAM)
                outcome.append(None)
            except (OSError, UnicodeError) as exc:
                outcome.append(exc)

        thread = threading.Thread(target=lookup, daemon=True)  # a stuck resolver is left behind
        thread.start()
        thread.join(seconds)
        if not outcome:
            raise RendezvousError(
                f"master_addr {self.master_addr!r} did not resolve within {seconds:g} s: give "
                "node 0's IP address, or a host name this machine can resolve"
            )
        if outcome[0] is not None:
            why = getattr(outcome[0], "strerror", None) or outcome[0]
            raise RendezvousError(
                f"master_addr {self.master_addr!r} does not resolve ({why}): give node 0's IP "
                "address, or a host name this machine can resolve"
            )


def identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that identifies a training run (for ``TrainConfig.run_id``): without
    where node 0 listens, which machine this is, or ``mode``, so that a run resumes whatever port
    it is relaunched on. The number of processes stays: it changes each rank's shard."""
    where = ("node_rank", "master_addr", "master_port", "rendezvous_timeout", "mode")
    return {k: v for k, v in cfg.items() if k not in where}


def global_batch(cfg: Mapping[str, Any]) -> int:
    """Samples per optimizer step: the per-device batch × devices × machines × micro-batches."""
    return (
        int(cfg["batch_size"])
        * Launch.from_config(cfg).world_size
        * int(cfg.get("grad_accum") or 1)
    )


def check_mode(cfg: Mapping[str, Any]) -> str:
    mode = cfg.get("mode", "train")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "eval" and cfg.get("devices", 1) * cfg.get("nnodes", 1) > 1:
        print("mode = eval evaluates in this process: devices and nnodes are not used", flush=True)
    return mode


def needed(cfg: Mapping[str, Any], rt) -> bool:
    """True in the notebook's process when the run asks for more than one process; False inside
    a rank (already under torchrun) and for a one-device run."""
    return Launch.from_config(cfg).world_size > 1 and rt.world_size == 1


def recorded_runtime(rt, cfg: Mapping[str, Any]):
    """The runtime a results file records: the notebook's, with the number of processes the
    training ran on (the notebook's own process is one of one)."""
    world = Launch.from_config(cfg).world_size if cfg.get("mode", "train") == "train" else 1
    return dataclasses.replace(rt, world_size=max(rt.world_size, world))


def batch_line(cfg: Mapping[str, Any]) -> str:
    """The sentence a notebook prints: ``global batch 96 = 12 per device × 1 device × 1 machine ×
    grad_accum 8``."""
    devices, nnodes = int(cfg.get("devices") or 1), int(cfg.get("nnodes") or 1)
    accum = int(cfg.get("grad_accum") or 1)
    return (
        f"global batch {global_batch(cfg)} = {cfg['batch_size']} per device × {devices} "
        f"device{'s' if devices > 1 else ''} × {nnodes} machine{'s' if nnodes > 1 else ''} × "
        f"grad_accum {accum}"
    )


def command(entry: str, config_path: Path, out_path: Path, launch: Launch) -> list[str]:
    """torchrun's command line, run through :mod:`nbzoo.lifeline` (it stops when its parent dies)."""
    return [
        sys.executable,
        "-m",
        "nbzoo.lifeline",
        "torch.distributed.run",
        *launch.torchrun_args(),
        "-m",
        "nbzoo.launch",
        entry,
        str(config_path),
        str(out_path),
    ]


def run(
    entry: str, cfg: Mapping[str, Any], workdir: str | os.PathLike, **kwargs: Any
) -> dict[str, Any]:
    """Run ``entry`` (``"module:function"``) on every rank under torchrun; return the record
    rank 0 wrote. The ranks' output is streamed as it comes; a failure raises with its tail."""
    launch = Launch.from_config(cfg)
    if launch.nnodes > 1:
        launch.resolve_master()
    workdir = Path(workdir)
    owned = safe_write.claim(workdir, WRITER, what="the launch folder")
    config_path, out_path = workdir / "launch.json", workdir / "record.json"
    owned.write_text("launch.json", json.dumps({"cfg": dict(cfg), "kwargs": kwargs}, default=str))
    owned.remove("record.json")
    cmd = command(entry, config_path, out_path, launch)
    batch = f", {batch_line(cfg)}" if "batch_size" in cfg else ""  # a job without batches
    print(
        f"launching {launch.world_size} processes ({launch.devices} on this machine, node "
        f"{launch.node_rank} of {launch.nnodes}){batch}:\n  {shlex.join(cmd)}",
        flush=True,
    )
    if launch.nnodes > 1:
        print(launch.waiting_for(), flush=True)
    tail: list[str] = []
    # its own session: a Ctrl-C at a terminal or a kernel interrupt reaches this process only,
    # and every way out of here stops torchrun's whole process group (nbzoo.lifeline)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        env=lifeline.child_environment(),
    )
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail = [*tail[-120:], line]
        proc.wait()
    finally:
        lifeline.stop_group(proc)
        proc.stdout.close()
    if proc.returncode != 0:
        if launch.nnodes > 1 and _never_met(tail):
            raise RendezvousError(
                f"{launch.waiting_for()}: gave up, the machines did not meet (torchrun exited "
                f"with {proc.returncode}). Start the notebook on every machine with the same "
                "nnodes, master_addr and master_port, or raise "
                "rendezvous_timeout; torchrun's last line: "
                + (tail[-1].strip() if tail else "(none)")
            )
        raise RuntimeError(
            f"torchrun exited with {proc.returncode} ({shlex.join(cmd)}); last lines:\n"
            + "".join(tail)
        )
    if launch.node_rank != 0:
        raise OtherNode(
            f"node {launch.node_rank} of {launch.nnodes}: its ranks finished; node 0 "
            f"({launch.master_addr}) writes the checkpoint and the results"
        )
    return json.loads(out_path.read_text())


# what torchrun's static rendezvous says when the TCPStore never connects or never fills
_RENDEZVOUS_FAILURES = ("DistNetworkError", "DistStoreError", "timed out", "Timed out")


def _never_met(tail: list[str]) -> bool:
    return any(marker in line for line in tail for marker in _RENDEZVOUS_FAILURES)


WRITER = "nbzoo.launch"


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write a JSON record atomically (a temporary file, then a rename) into a folder that is
    nbzoo's (nbzoo.safe_write), replacing only a record nbzoo wrote."""
    path = Path(path)
    owned = safe_write.claim(path.parent, WRITER)
    owned.write_text(path.name, json.dumps(record, default=_jsonable))


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _rank_threads(kind: str) -> None:
    """On a CPU the ranks share the machine: each gets its share of the cores."""
    if kind != "cpu":
        return
    import torch

    from nbzoo import cpus

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, cpus.share() // local))


def main(argv: list[str] | None = None) -> None:
    """``python -m nbzoo.launch MODULE:FUNCTION CONFIG.json RECORD.json`` on every rank."""
    import torch.distributed as dist

    from nbzoo import device as nbdevice
    from nbzoo.presets import Config

    # torchrun gone (killed): this rank goes too
    lifeline.die_with_parent(parent=lifeline.parent_from_environment())
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        raise SystemExit("usage: python -m nbzoo.launch MODULE:FUNCTION CONFIG.json RECORD.json")
    entry, config_path, out_path = argv
    module_name, _, function_name = entry.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    blob = json.loads(Path(config_path).read_text())
    cfg = Config(blob["cfg"])
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(cfg["threads"])
    else:
        _rank_threads(nbdevice.resolve_device(cfg.get("device", "auto")))
    rt = nbdevice.setup(
        cfg.get("device", "auto"),
        cfg.get("precision", "auto"),
        cfg.get("seed", 0),
        loss_scale=cfg.get("enable_lossscale", True),
    )
    try:
        record = function(cfg, rt, **blob["kwargs"])
        if rt.is_main:
            write_record(out_path, record)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
