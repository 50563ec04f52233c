"""`torpor-worker`: one runtime in one process, serving `torpor.v1.Worker` on a Unix socket.

torpord starts it with the device it may use and the chunk store to read and write
snapshots; it serves until Shutdown or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

from torpor import log
from torpor.errors import TorporError
from torpor.units import parse_size
from torpor.v1 import worker_pb2_grpc
from torpor.worker.engine.options import resolve_device
from torpor.worker.pager.placement import PagerOptions
from torpor.worker.service import WorkerConfig, WorkerService


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torpor-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket to serve on")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--store", required=True, type=Path, help="chunk store root (snapshots)")
    parser.add_argument("--workdir", type=Path, help="private scratch directory")
    parser.add_argument("--handle-size", default="512MiB", help="arena handle size")
    parser.add_argument("--graph-pool", default="512MiB", help="CUDA graph pool size")
    parser.add_argument("--no-host-copy", action="store_true", help="keep no host copy of weights")
    parser.add_argument("--keeper", help="Unix socket of the GPU's keeper (it fills deep resumes)")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    log.configure(json=True, level=args.log_level)
    pager = PagerOptions(
        device=args.device,
        handle_bytes=parse_size(args.handle_size),
        graph_pool_bytes=parse_size(args.graph_pool),
        host_copy=not args.no_host_copy,
        keeper_socket=args.keeper,
    )
    pager.validate()
    workdir = args.workdir or args.socket.with_suffix(".d")
    stop = threading.Event()
    service = WorkerService(WorkerConfig(args.device, args.store, workdir, pager), stop.set)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc"))
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    args.socket.parent.mkdir(parents=True, exist_ok=True)
    args.socket.unlink(missing_ok=True)
    server.add_insecure_port(f"unix://{args.socket}")
    server.start()
    os.chmod(args.socket, 0o600)  # torpord (the same user) only
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.get_logger("worker").info(
        "worker_serving", socket=str(args.socket), device=args.device, pid=os.getpid()
    )
    stop.wait()
    if service.runtime is not None:
        service.runtime.close()
    server.stop(grace=2).wait()
    args.socket.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        resolve_device(args.device)  # fail at start, not at the first Load
    except TorporError as err:
        print(f"torpor-worker: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(args))


if __name__ == "__main__":
    main()
