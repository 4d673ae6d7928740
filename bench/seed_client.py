"""The stock seed client (viam-sdk) as a benchmark subject; run by `.venv-interop/bin/python`.

    seed_client.py tabular ADDRESS KEY_ID KEY_FILE CALLS PER_CALL
    seed_client.py file    ADDRESS KEY_ID KEY_FILE PATH

Prints ONE JSON line: wall seconds, CPU seconds (this process, all threads) and the
items sent over the timed region (connect and authenticate are outside it). Peak RSS is
taken by the parent from wait4(). This file must never import `edged` (and `edged`
never imports viam): the two live in separate venvs.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


def reading(seq: int) -> dict[str, Any]:
    """The same 5-number struct the edged side captures (bench.compare.reading)."""
    return {"seq": float(seq), "x": 1.5, "y": -2.25, "temp_c": 21.5, "humidity": 40.0}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _connect(address: str, key_id: str, key: str) -> Any:
    from viam.app.viam_client import ViamClient  # type: ignore[import-not-found]
    from viam.rpc.dial import DialOptions  # type: ignore[import-not-found]

    opts = DialOptions.with_api_key(api_key=key, api_key_id=key_id)
    opts.insecure = True  # plaintext loopback, like the edged side
    return await ViamClient.create_from_dial_options(opts, app_url=address)


async def tabular(address: str, key_id: str, key: str, calls: int, per_call: int) -> dict[str, Any]:
    client = await _connect(address, key_id, key)
    try:
        data = client.data_client
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        # Warm-up call outside the timed region (connection, token, first-call costs).
        await data.tabular_data_capture_upload(
            [reading(0)], "bench", "rdk:component:sensor", "bench", "Readings", [(t0, t0)]
        )
        wall0, cpu0 = time.perf_counter(), _cpu()
        seq = 0
        for _ in range(calls):
            rows = [reading(seq + i) for i in range(per_call)]
            times = [(t0 + timedelta(milliseconds=seq + i),) * 2 for i in range(per_call)]
            await data.tabular_data_capture_upload(
                rows, "bench", "rdk:component:sensor", "bench", "Readings", times
            )
            seq += per_call
        wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
    finally:
        client.close()
    return {"wall_s": wall, "cpu_s": cpu, "readings": calls * per_call}


async def file(address: str, key_id: str, key: str, path: str) -> dict[str, Any]:
    client = await _connect(address, key_id, key)
    try:
        wall0, cpu0 = time.perf_counter(), _cpu()
        await client.data_client.file_upload_from_path(filepath=path, part_id="bench")
        wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
    finally:
        client.close()
    return {"wall_s": wall, "cpu_s": cpu, "bytes": Path(path).stat().st_size}


def main(argv: list[str]) -> int:
    mode, address, key_id, key_file, *rest = argv
    key = Path(key_file).read_text().strip()
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # the SDK logs to stdout
    try:
        if mode == "tabular":
            out = asyncio.run(tabular(address, key_id, key, int(rest[0]), int(rest[1])))
        else:
            out = asyncio.run(file(address, key_id, key, rest[0]))
    finally:
        sys.stdout = real_stdout
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
