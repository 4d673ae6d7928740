"""A tiny robot for `make run`: writes capture files like real robot software does.

A temperature sensor (tabular, files closed every couple of seconds) and a camera
(one binary reading per file), into `<dir>/<api>/<name>/<method>/<timestamp>.capture`.
`python -m edged.daemon.demo DIR [--seconds N]`. SIGINT/SIGTERM (Ctrl-C, `make run` ending)
stop it between readings, and it finishes its open files, so it never leaves a `.prog`
behind for the next run to recover.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter


def main() -> None:
    parser = argparse.ArgumentParser(description="write demo robot capture files")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after N s (0: never)")
    parser.add_argument("--hz", type=float, default=20.0, help="sensor readings per second")
    args = parser.parse_args()
    sensor_meta = pb.DataCaptureMetadata(
        component_type="rdk:component:sensor",
        component_name="demo-temp",
        method_name="Readings",
        type=pb.DATA_TYPE_TABULAR_SENSOR,
        file_extension=".dat",
        tags=["demo"],
    )
    camera_meta = pb.DataCaptureMetadata(
        component_type="rdk:component:camera",
        component_name="demo-cam",
        method_name="ReadImage",
        type=pb.DATA_TYPE_BINARY_SENSOR,
        file_extension=".jpeg",
        mime_type="image/jpeg",
        tags=["demo"],
    )
    sensor = CaptureWriter(args.dir, sensor_meta, max_file_age_s=2.0)
    camera = CaptureWriter(args.dir, camera_meta)
    rng = random.Random(os.getpid())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())  # never interrupt a write half-way
    start = time.monotonic()
    n = 0
    print(f"demo robot writing capture files under {args.dir} (Ctrl-C to stop)", flush=True)
    try:
        while not stop.is_set() and (not args.seconds or time.monotonic() - start < args.seconds):
            now = datetime.now(UTC)
            temp = 20 + 3 * math.sin(n / 50) + rng.gauss(0, 0.2)
            sensor.write_tabular(
                {"temp_c": round(temp, 3), "seq": n}, time_requested=now, time_received=now
            )
            if n % int(args.hz * 5) == 0:  # a "photo" every 5 s
                camera.write_binary(rng.randbytes(20_000), time_requested=now, time_received=now)
                camera.rotate()  # one image per file, like the robot
            n += 1
            stop.wait(1 / args.hz)
    finally:
        sensor.close()
        camera.close()


if __name__ == "__main__":
    main()
