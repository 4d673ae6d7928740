"""An acknowledging-only DataSync server for client benchmarks (`python -m bench.acksrv`).

It authenticates like `edged ingest` (AuthService, bearer tokens checked on every call)
and answers every upload as soon as it has received it, storing nothing, so a client
benchmark measures the client and not the server's storage. Tabular requests are decoded
(to count the readings acknowledged, a correctness check); streamed chunks are counted
as bytes without being decoded.

Prints `acksrv: listening on 127.0.0.1:PORT` first; on SIGTERM prints one JSON line of
totals ({"calls", "readings", "stream_bytes", "stream_calls"}) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from grpclib.encoding.proto import ProtoCodec
from grpclib.server import Server, Stream

from edged._proto.app.datasync.v1 import data_sync_grpc
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.ingest.auth import ApiKey, AuthService, KeyStore

_RAW = (pb.FileUploadRequest, pb.StreamingDataCaptureUploadRequest)


class _Codec(ProtoCodec):
    """Streamed chunks stay bytes (only their size is counted); the rest decodes."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        if message_type in _RAW:
            return data
        return message_type.FromString(data)


class AckDataSync(data_sync_grpc.DataSyncServiceBase):
    def __init__(self) -> None:
        self.totals = {"calls": 0, "readings": 0, "stream_bytes": 0, "stream_calls": 0}

    async def DataCaptureUpload(self, stream: Stream[Any, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None
        self.totals["calls"] += 1
        self.totals["readings"] += len(req.sensor_contents)
        await stream.send_message(pb.DataCaptureUploadResponse(file_id="ack"))

    async def _drain(self, stream: Stream[Any, Any]) -> None:
        self.totals["stream_calls"] += 1
        async for chunk in stream:
            self.totals["stream_bytes"] += len(chunk)

    async def FileUpload(self, stream: Stream[Any, Any]) -> None:
        await self._drain(stream)
        await stream.send_message(pb.FileUploadResponse(file_id="ack"))

    async def StreamingDataCaptureUpload(self, stream: Stream[Any, Any]) -> None:
        await self._drain(stream)
        await stream.send_message(pb.StreamingDataCaptureUploadResponse(file_id="ack"))


async def serve(key_id: str, key: str) -> dict[str, int]:
    from grpclib.events import RecvRequest, listen

    keys = KeyStore([ApiKey(key_id, key, "bench-org", "")])
    sync = AckDataSync()
    server = Server([AuthService(keys), sync], codec=_Codec())
    listen(server, RecvRequest, keys.on_request)
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"acksrv: listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()
    return sync.totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.acksrv")
    parser.add_argument("--api-key-id", required=True)
    parser.add_argument("--api-key-file", type=Path, required=True)
    args = parser.parse_args(argv)
    key = args.api_key_file.read_text().strip()
    totals = asyncio.run(serve(args.api_key_id, key))
    print(json.dumps(totals), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
