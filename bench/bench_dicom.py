"""DICOM in and out: instances/s received to disk by `dicom-listen`, and C-STORE -> SR-in-Orthanc latency.

Part 1 (receive): a real `cxr-triage dicom-listen` process on a loopback port; a pynetdicom SCU in this
process sends ``--films`` 2048x2048 12-bit CR films (uncompressed, ~8 MiB each, pixels from Kermany
films) over one association, then the same number over four parallel associations. A C-STORE counts
when its success response is back, which the listener sends only after the file is flushed (fsync) and
renamed into the drop folder. The SCU shares the CPU with the listener (same machine).

Part 2 (latency): Orthanc (Debian package, temporary config, loopback ports), `dicom-listen`, and
`cxr-triage watch --send-results ORTHANC@127.0.0.1:port` (SQLite, shipped model). Films are sent at
``--rate`` films/s for ``--seconds``; latency = time from the C-STORE success to the moment this script
sees the film's SR in Orthanc (its /changes feed, polled every 0.1 s). One warm-up film is sent and
waited for first (model load). Target (issue 11): p95 <= 3 s at 1 film/s.

Run: ``flock .work/heavy.lock .venv/bin/python bench/bench_dicom.py`` (``--quick`` for development).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, corpus, databases, processes, results  # noqa: E402
from bench.results import log  # noqa: E402

ORTHANC = "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def films(count: int, seed: int = 5) -> list:
    """``count`` distinct 2048x2048 12-bit CR datasets (distinct UIDs, so distinct bytes)."""
    import numpy as np

    sources = corpus.source_images(seed)
    pixels = []
    for source in sources[: min(count, 8)]:
        _, grey = corpus._grey_2048(str(source), corpus.FILM_SIDE)
        pixels.append((grey.astype(np.uint16) << 4) | (grey.astype(np.uint16) >> 4))  # 8 -> 12 bit
    return [corpus._dicom_dataset(pixels[i % len(pixels)], i) for i in range(count)]


def start_listener(drop: Path, log_path: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    port = port or free_port()
    proc = subprocess.Popen(
        common.cli(
            "dicom-listen", str(drop), "--port", str(port), "--bind", "127.0.0.1", "--log-level", "WARNING"
        ),
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.2)
    raise SystemExit(f"dicom-listen did not start: {log_path.read_text()[-2000:]}")


def send(port: int, datasets: list, statuses: list, times: list | None = None) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="BENCH_SCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    ae.maximum_pdu_size = 0
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    if not assoc.is_established:
        raise SystemExit("association with dicom-listen failed")
    try:
        for ds in datasets:
            statuses.append(getattr(assoc.send_c_store(ds), "Status", None))
            if times is not None:
                times.append(time.time())
    finally:
        assoc.release()


def receive_rate(port: int, datasets: list, associations: int) -> tuple[float, int]:
    """Instances/s over ``associations`` parallel associations, and how many succeeded."""
    share = [datasets[i::associations] for i in range(associations)]
    statuses: list = []
    threads = [threading.Thread(target=send, args=(port, part, statuses)) for part in share]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return len(datasets) / elapsed, sum(1 for s in statuses if s == 0)


def part_receive(args, work: Path) -> tuple[str, list[str]]:
    count = 8 if args.quick else args.films
    log(f"building {count} 2048x2048 12-bit films")
    datasets = films(count)
    size_mib = len(datasets[0].PixelData) / 2**20
    drop = work / "drop-receive"
    rows, notes = [], []
    proc, port = start_listener(drop, work / "listen-receive.log")
    try:
        for associations in (1, 4):
            shutil.rmtree(drop, ignore_errors=True)
            drop.mkdir(parents=True)
            for ds in datasets:  # new UIDs each round: nothing is written over
                from pydicom.uid import generate_uid

                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            rate, ok = receive_rate(port, datasets, associations)
            on_disk = len([p for p in drop.iterdir() if not p.name.startswith(".")])
            rows.append([associations, count, ok, on_disk, f"{rate:.1f}", f"{rate * size_mib:.0f}"])
            log(f"{associations} association(s): {rate:.1f} instances/s")
    finally:
        processes.terminate(proc)
        shutil.rmtree(drop, ignore_errors=True)
    body = results.table(
        ["associations", "films sent", "success responses", "files in drop folder", "instances/s", "MiB/s"],
        rows,
    )
    notes.append(
        f"each film {size_mib:.1f} MiB of pixel data, Explicit VR Little Endian; fsync before success"
    )
    return body, notes


def part_latency(args, work: Path, model_dir: Path) -> tuple[str, list[str]]:
    sys.path.insert(0, str(results.ROOT))
    from tests.orthanc import Orthanc

    listen_port = free_port()
    orthanc = Orthanc(work / "orthanc", {"cxr": ("CXR_TRIAGE", listen_port)}).start()
    drop = work / "drop-latency"
    url = databases.fresh_sqlite(work / "latency.sqlite3")
    env = dict(os.environ, **common.bench_env(model_dir))
    listener, _ = start_listener(drop, work / "listen-latency.log", listen_port)
    watch = subprocess.Popen(
        common.cli(
            "watch",
            str(drop),
            "--database-url",
            url,
            "--send-results",
            orthanc.destination,
            "--log-level",
            "WARNING",
        ),
        stdout=(work / "watch-latency.log").open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    seen: dict[str, float] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_watch_orthanc, args=(orthanc, seen, stop), daemon=True)
    poller.start()
    seconds = 10 if args.quick else args.seconds
    count = max(int(seconds * args.rate), 1)
    datasets = films(count + 1, seed=9)
    try:
        time.sleep(2)
        log("warm-up film (model load)")
        warm_sent: list = []
        send(listen_port, datasets[:1], [], warm_sent)
        _wait(lambda: datasets[0].StudyInstanceUID in seen, 600, "the warm-up SR")
        cold = seen[datasets[0].StudyInstanceUID] - warm_sent[0]
        log(f"cold latency {cold:.1f} s; now {count} films at {args.rate}/s")
        sent_at: dict[str, float] = {}
        for n, ds in enumerate(datasets[1:]):
            target = time.time() + 1 / args.rate
            times: list = []
            send(listen_port, [ds], [], times)
            sent_at[ds.StudyInstanceUID] = times[0]
            if n % 10 == 0:
                log(f"  sent {n + 1}/{count}")
            time.sleep(max(target - time.time(), 0))
        _wait(lambda: all(uid in seen for uid in sent_at), 180, "every SR")
        latencies = [seen[uid] - t for uid, t in sent_at.items() if uid in seen]
    finally:
        stop.set()
        processes.terminate(watch)
        processes.terminate(listener)
        orthanc.stop()
    p50, p95 = results.percentile(latencies, 50), results.percentile(latencies, 95)
    body = results.table(
        ["films", "rate (films/s)", "SRs in Orthanc", "p50 (s)", "p95 (s)", "max (s)", "cold first film (s)"],
        [
            [
                count,
                args.rate,
                len(latencies),
                f"{p50:.2f}",
                f"{p95:.2f}",
                f"{max(latencies):.2f}",
                f"{cold:.1f}",
            ]
        ],
    )
    verdict = "met" if p95 <= 3.0 else "MISSED"
    return body, [
        f"target p95 <= 3 s at 1 film/s: {verdict}",
        "path: C-STORE -> dicom-listen (fsync, rename) -> watch (inotify, decode, score, outbox row) "
        "-> outbox sender (polls every 0.25 s, C-STORE SR) -> Orthanc",
    ]


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def _watch_orthanc(orthanc, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when each SR appears in Orthanc, keyed by its StudyInstanceUID."""
    since = 0
    while not stop.is_set():
        try:
            changes = orthanc.get("/changes", since=str(since), limit="100").json()
        except Exception:  # noqa: BLE001 - Orthanc restarting or busy: try again
            time.sleep(0.1)
            continue
        now = time.time()
        for change in changes["Changes"]:
            if change["ChangeType"] == "NewInstance":
                instance = orthanc.get(f"/instances/{change['ID']}").json()
                series = orthanc.get(f"/series/{instance['ParentSeries']}").json()
                if series["MainDicomTags"].get("Modality") == "SR":
                    study = orthanc.get(f"/series/{instance['ParentSeries']}/study").json()
                    seen.setdefault(study["MainDicomTags"]["StudyInstanceUID"], now)
        since = changes["Last"]
        if changes["Done"]:
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--films", type=int, default=64, help="films per receive run (default 64)")
    parser.add_argument("--rate", type=float, default=1.0, help="films/s in the latency run (default 1)")
    parser.add_argument("--seconds", type=float, default=60, help="length of the latency run (default 60)")
    parser.add_argument("--skip-latency", action="store_true", help="only the receive part")
    args = parser.parse_args(argv)
    if not Path(ORTHANC).is_file() and not args.skip_latency:
        raise SystemExit("Orthanc is not installed (apt-get install orthanc)")
    model_dir, model = common.model_under_test(args)
    work = corpus.WORK / "dicom"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    receive, receive_notes = part_receive(args, work)
    body = "### Received to disk by dicom-listen (2048x2048 12-bit CR)\n\n" + receive
    notes = receive_notes
    if not args.skip_latency:
        latency, latency_notes = part_latency(args, work, model_dir)
        body += "\n\n### C-STORE to SR stored in Orthanc (watch --send-results)\n\n" + latency
        notes += latency_notes
    notes.append(
        "the sending SCU, the listener, watch (2 decode processes) and Orthanc share the machine's cores"
    )
    results.publish(args, "DICOM receive rate and C-STORE -> SR latency (issue 11)", model, body, notes)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
