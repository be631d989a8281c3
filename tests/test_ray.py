"""The Ray engine: the local engine's outputs file for file, failures recorded with their reasons,
a killed worker's batches retried, a killed driver resumed from the store, two nodes on one machine."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
psutil = pytest.importorskip("psutil")

from test_shards import write_shards  # noqa: E402

from captionkit import ray_engine  # noqa: E402
from captionkit.errors import OptionError  # noqa: E402
from captionkit.models import load  # noqa: E402
from captionkit.models.base import Captioner, CaptionerWrapper  # noqa: E402
from captionkit.options import GenerationOptions, LoadOptions  # noqa: E402
from captionkit.pipeline import Pipeline, RunOptions  # noqa: E402
from captionkit.ray_engine import EngineOptions, ModelRecipe  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
GEN = GenerationOptions(max_new_tokens=6)
FP32 = LoadOptions(device="cpu", dtype="float32")
FORMATS = ("captions.txt", "txt", "jsonl", "csv", "parquet", "webdataset")
TWO_REPLICAS = EngineOptions(engine="ray", ray_workers=2, cpus_per_worker=1)
ONE_REPLICA = EngineOptions(engine="ray", ray_workers=1, cpus_per_worker=1)


def ray_env() -> dict[str, str]:
    """The environment of every Ray process these tests start: this checkout's captionkit and the
    test helpers on the path (workers unpickle `flaky_loader` from here), and one auth mode, since a
    node or driver with another cannot join (token auth is Ray's default; these clusters listen on
    127.0.0.1 only)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
            "RAY_AUTH_MODE": "disabled"}


class Flaky(CaptionerWrapper):
    """A real captioner that fails on solid red images, as a model fails on a bad input."""

    def caption(self, images, options, prompts=None):
        if any(image.getextrema() == ((255, 255), (0, 0), (0, 0)) for image in images):
            raise ValueError("solid red images upset this model")
        return self.inner.caption(images, options, prompts)


def flaky_loader(name: str, options: LoadOptions) -> Flaky:
    return Flaky(load(name, options))


class Logged(CaptionerWrapper):
    """A real captioner that logs each batch it starts and ends (its process, when, its images'
    sizes) and dwells in it a moment, so that a kill can land mid-batch and the log shows it."""

    def __init__(self, inner: Captioner, log: str) -> None:
        super().__init__(inner)
        self.log = log

    def caption(self, images, options, prompts=None):
        sizes = [list(image.size) for image in images]
        self._write("start", sizes)
        time.sleep(0.3)
        predictions = self.inner.caption(images, options, prompts)
        self._write("end", sizes)
        return predictions

    def _write(self, event: str, sizes: list[list[int]]) -> None:
        entry = {"pid": os.getpid(), "at": time.time(), "event": event, "sizes": sizes}
        with open(self.log, "a") as log:
            log.write(json.dumps(entry) + "\n")


def logged_loader(log: str, name: str, options: LoadOptions) -> Logged:
    return Logged(load(name, options), log)


def logged_batches(log: Path) -> list[dict]:
    """The complete entries of a `Logged` captioner's log, oldest first."""
    text = log.read_text() if log.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def kill_mid_batch(log: Path, actors, timeout: float = 60) -> tuple[int, list]:
    """SIGKILL one of `actors()` seen just after it started a batch (it dwells there): the
    process id and the batch's image sizes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = actors()
        started: dict[int, dict] = {}
        for entry in logged_batches(log):
            if entry["event"] == "start":
                started[entry["pid"]] = entry
            else:
                started.pop(entry["pid"], None)
        for actor in running:
            entry = started.get(actor.pid)
            if entry is not None and time.time() - entry["at"] < 0.15:
                actor.send_signal(signal.SIGKILL)
                return actor.pid, entry["sizes"]
        time.sleep(0.01)
    raise AssertionError(f"no actor was seen starting a batch in {timeout} s")


def assert_retried(log: Path, pid: int, sizes: list) -> None:
    """The batch killed with process `pid` never ended there, and its images were predicted again
    by another process."""
    entries = logged_batches(log)
    assert not any(e["pid"] == pid and e["event"] == "end" and e["sizes"] == sizes for e in entries), \
        "the killed actor had finished its batch: nothing was retried"
    elsewhere = [size for e in entries if e["event"] == "end" and e["pid"] != pid for size in e["sizes"]]
    assert all(size in elsewhere for size in sizes), "the killed batch was predicted again"


@pytest.fixture(scope="session")
def ray_local():
    """Ray on this machine for the in-process tests: two CPUs, its own temporary folder."""
    temp = tempfile.mkdtemp(prefix="ck-ray-")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _temp_dir=temp,
             runtime_env={"env_vars": {"PYTHONPATH": ray_env()["PYTHONPATH"]}})
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, photo_dir, photos) -> list[str]:
    """Photos, a duplicate, files that do not decode, an image the model fails on, and two shards."""
    folder = tmp_path_factory.mktemp("mixed")
    for png in photo_dir.iterdir():
        Image.open(png).resize((80, 60)).save(folder / png.name)
    shutil.copy(folder / "coffee.png", folder / "coffee copy.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    data = (photo_dir / "rocket.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (20, 20), "red").save(folder / "red.png")
    shards = tmp_path_factory.mktemp("mixed-shards")
    write_shards(shards, [photo.resize((64, 48)) for photo in photos[:5]], per_shard=3)
    return [str(folder), f"{shards}/{{00000..00001}}.tar"]


def outputs(folder: Path) -> dict[str, object]:
    """Every output file under `folder` with the timing fields left out: the model's seconds per
    image differ from run to run, everything else must not."""
    found: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir() or name.startswith("captionkit.db"):
            continue
        if path.suffix == ".jsonl":
            found[name] = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                           for line in path.read_text().splitlines()]
        elif path.suffix == ".csv":
            found[name] = [{k: v for k, v in row.items() if k != "seconds"}
                           for row in csv.DictReader(io.StringIO(path.read_text()))]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            found[name] = pq.read_table(path).drop_columns(["seconds"]).to_pylist()
        elif path.suffix == ".tar":
            found[name] = _shard_members(path)
        else:
            found[name] = path.read_bytes()
    return found


def _shard_members(path: Path) -> list[tuple[str, object]]:
    """A caption shard's members in order, its JSON records without their seconds."""
    with tarfile.open(path) as tar:
        members = [(name, tar.extractfile(name).read()) for name in tar.getnames()]
    return [(name, {k: v for k, v in json.loads(data).items() if k != "seconds"}
             if name.endswith(".json") else data) for name, data in members]


def recorded_paths(output_dir: Path) -> list[str]:
    """Every path the store holds a result for, once per row."""
    with sqlite3.connect(output_dir / "captionkit.db") as db:
        return [os.fsdecode(bytes(path)) for (path,) in db.execute("SELECT path FROM results")]


def ray_run(model: ModelRecipe, inputs: list[str], output_dir: Path, engine: EngineOptions,
            executor_wrapper=None, **options):
    """A run as the CLI's `--engine ray` makes it: the model described by a worker, its batches
    predicted on Ray actors."""
    pipeline, executor = ray_engine.pipeline_for(
        model, GEN, RunOptions(output_dir=output_dir, progress=False, **options), engine)
    assert isinstance(pipeline.captioner, ray_engine.RemoteCaptioner)
    if executor_wrapper is not None:
        executor = executor_wrapper(executor)
    return pipeline.run(inputs, executor=executor)


def test_ray_and_local_outputs_are_identical_file_for_file(ray_local, blip_dir, mixed_inputs, tmp_path):
    local = Pipeline(flaky_loader(str(blip_dir), FP32), GEN, RunOptions(
        output_dir=tmp_path / "local", progress=False, formats=FORMATS, batch_size=4)).run(mixed_inputs)
    model = ModelRecipe(str(blip_dir), FP32, loader=flaky_loader)
    summary = ray_run(model, mixed_inputs, tmp_path / "ray", TWO_REPLICAS,
                      formats=FORMATS, batch_size=4)
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    assert summary.done == local.done == 14 and summary.model_failures == local.model_failures == 1
    reasons = dict(summary.failed)
    assert reasons == dict(local.failed) and len(reasons) == 4
    assert reasons["red.png"] == "captioning failed: ValueError: solid red images upset this model"
    assert "truncated" in reasons["cut.png"] and "looks like text" in reasons["notes.jpg"]
    paths = recorded_paths(tmp_path / "ray")
    assert len(paths) == len(set(paths)) == 18, "every image recorded exactly once"


def test_a_worker_that_would_record_under_another_key_refuses(ray_local, blip_dir, blip_fp32, photo_dir,
                                                                tmp_path):
    pipeline = Pipeline(blip_fp32, GEN, RunOptions(output_dir=tmp_path, progress=False))
    bf16 = ModelRecipe(str(blip_dir), LoadOptions(device="cpu", dtype="bfloat16"))
    executor = ray_engine.executor_for(pipeline, ONE_REPLICA, bf16)
    with pytest.raises(OptionError, match="loads on this Ray worker as .*bfloat16"):
        pipeline.run([str(photo_dir)], executor=executor)


def test_gpu_jpeg_runs_on_ray_with_the_key_its_workers_compute(ray_local, blip_dir, blip_fp32, photo_dir,
                                                               tmp_path):
    """The workers check the driver's resume key against their own, which `--gpu-jpeg` is part of
    where nvJPEG runs; on the CPU it does not, and the run is the local one's."""
    local = Pipeline(blip_fp32, GEN, RunOptions(output_dir=tmp_path / "local", progress=False,
                                                gpu_jpeg=True)).run([str(photo_dir)])
    summary = ray_run(ModelRecipe(str(blip_dir), FP32), [str(photo_dir)], tmp_path / "ray", ONE_REPLICA,
                      gpu_jpeg=True)
    assert summary.done == local.done > 0
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


def test_a_model_the_workers_cannot_load_reads_as_the_local_error(ray_local, tmp_path):
    from captionkit.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no-such-captioner"):
        ray_engine.describe(ModelRecipe(str(tmp_path / "no-such-captioner"), FP32), ONE_REPLICA)


def actor_processes(root: psutil.Process) -> list[psutil.Process]:
    """The Ray Data actors running CaptionActor among `root`'s descendants."""
    found = []
    for process in root.children(recursive=True):
        try:
            if "CaptionActor" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


class KillsAWorker:
    """Passes an executor's batches on; after the first, kills (kill -9) an actor mid-batch."""

    def __init__(self, inner, root: psutil.Process, log: Path) -> None:
        self.inner, self.root, self.log = inner, root, log
        self.killed: tuple[int, list] | None = None

    def execute(self, items):
        for batch in self.inner.execute(items):
            if self.killed is None:
                self.killed = kill_mid_batch(self.log, lambda: actor_processes(self.root))
            yield batch


class WaitsForTheDriver(CaptionerWrapper):
    """A real captioner that starts each batch after its first only once the driver has said it
    received a batch (the file `received` exists), and notes in `stalled` any wait that ran out."""

    def __init__(self, inner: Captioner, received: str, stalled: str) -> None:
        super().__init__(inner)
        self.received, self.stalled, self.batches = Path(received), Path(stalled), 0

    def caption(self, images, options, prompts=None):
        self.batches += 1
        if self.batches > 1 and not _appears(self.received, seconds=60):
            self.stalled.write_text(f"batch {self.batches} waited 60 s for the driver\n")
        return self.inner.caption(images, options, prompts)


def _appears(path: Path, seconds: float) -> bool:
    """Whether `path` exists within `seconds`."""
    return _comes_true(path.exists, seconds)


def _comes_true(check, seconds: float) -> bool:
    """Whether `check()` is true within `seconds`."""
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def waiting_loader(received: str, stalled: str, name: str, options: LoadOptions) -> WaitsForTheDriver:
    return WaitsForTheDriver(load(name, options), received, stalled)


class SaysItReceived:
    """Passes an executor's batches on, creating the file `received` once the first arrives."""

    def __init__(self, inner, received: Path) -> None:
        self.inner, self.received = inner, received

    def execute(self, items):
        for batch in self.inner.execute(items):
            self.received.touch()
            yield batch


def test_each_batch_reaches_the_driver_while_the_replica_predicts_the_next(
        ray_local, blip_dir, photo_dir, tmp_path):
    """A batch is recorded as soon as its replica finishes it, not once the next one is done too
    (Ray Data's iterator prefetches a batch unless told not to): the replica's second batch waits
    until the driver has the first."""
    received, stalled = tmp_path / "received", tmp_path / "stalled"
    model = ModelRecipe(str(blip_dir), FP32, loader=functools.partial(
        waiting_loader, str(received), str(stalled)))
    summary = ray_run(model, [str(photo_dir)], tmp_path / "ray", ONE_REPLICA, batch_size=2,
                      executor_wrapper=lambda executor: SaysItReceived(executor, received))
    assert summary.done == len(list(photo_dir.iterdir())) > 2 and not summary.failed
    assert not stalled.exists(), stalled.read_text()


class WaitsForTheNextBatch(CaptionerWrapper):
    """A real captioner that holds its first batch until an image of another batch has had its
    input made in this replica (the decoding threads run `preprocess`), and notes in `stalled` a
    wait that ran out: a replica that took one batch at a time would never get there."""

    def __init__(self, inner: Captioner, stalled: str) -> None:
        super().__init__(inner)
        self.stalled, self.made, self.first = Path(stalled), set(), True

    def __getattribute__(self, name: str):
        if name == "preprocess":
            return object.__getattribute__(self, "_noted")
        return super().__getattribute__(name)

    def _noted(self, image: Image.Image):
        self.made.add(image.size)
        return self.inner.preprocess(image)

    def caption(self, images, options, prompts=None):
        if self.first:
            self.first = False
            mine = {image.size for image in images}
            if not _comes_true(lambda: bool(self.made - mine), seconds=30):
                self.stalled.write_text("no other batch was decoded while the first was predicted\n")
        return self.inner.caption(images, options, prompts)


def next_batch_loader(stalled: str, name: str, options: LoadOptions) -> WaitsForTheNextBatch:
    return WaitsForTheNextBatch(load(name, options), stalled)


def test_a_replica_decodes_the_next_batch_while_it_predicts_one(
        ray_local, blip_dir, blip_fp32, many_photos, tmp_path):
    """One replica, batches of two: while the model predicts a batch, the next batch's images are
    decoded and made into inputs, and the captions are the local engine's."""
    stalled = tmp_path / "stalled"
    model = ModelRecipe(str(blip_dir), FP32, loader=functools.partial(next_batch_loader, str(stalled)))
    summary = ray_run(model, [str(many_photos)], tmp_path / "ray", ONE_REPLICA, batch_size=2)
    assert summary.done == 24 and not summary.failed
    assert not stalled.exists(), stalled.read_text()
    Pipeline(blip_fp32, GEN, RunOptions(output_dir=tmp_path / "local", progress=False,
                                        batch_size=2)).run([str(many_photos)])
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, photos) -> Path:
    """24 distinct small images: enough batches of two that a kill lands mid-run."""
    folder = tmp_path_factory.mktemp("many")
    for index in range(24):
        photo = photos[index % len(photos)].resize((48 + index, 40 + index))
        photo.save(folder / f"photo-{index:02d}.png")
    return folder


def test_a_killed_worker_has_its_batches_retried(ray_local, blip_dir, blip_fp32, many_photos, tmp_path):
    local = RunOptions(output_dir=tmp_path / "local", progress=False)
    Pipeline(blip_fp32, GEN, local).run([str(many_photos)])
    killers: list[KillsAWorker] = []
    log = tmp_path / "batches.jsonl"

    def killing(executor) -> KillsAWorker:
        killers.append(KillsAWorker(executor, psutil.Process(), log))  # Ray's processes are our children
        return killers[-1]

    model = ModelRecipe(str(blip_dir), FP32, loader=functools.partial(logged_loader, str(log)))
    summary = ray_run(model, [str(many_photos)], tmp_path / "ray", TWO_REPLICAS, executor_wrapper=killing,
                      batch_size=2)
    assert killers[0].killed is not None and not psutil.pid_exists(killers[0].killed[0])
    assert_retried(log, *killers[0].killed)
    assert summary.done == 24 and not summary.failed, "no image lost, none counted twice"
    paths = recorded_paths(tmp_path / "ray")
    assert len(paths) == len(set(paths)) == 24
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


DRIVER = textwrap.dedent("""
    import functools, json, sys, time
    from captionkit import ray_engine
    from captionkit.options import GenerationOptions, LoadOptions
    from captionkit.pipeline import RunOptions

    model, inputs, output_dir, address, log = sys.argv[1:6]
    engine = ray_engine.EngineOptions(engine="ray", ray_address=address or None, ray_workers=2,
                                      cpus_per_worker=1, local_cpus=None if address else 2)
    ray_engine.connect(engine)
    if address:  # wait for the second node to join, so the pool has an actor on each
        import ray
        deadline = time.time() + 120
        while ray.cluster_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.5)
    loader = None
    if log:  # each batch logged, from the test module on the workers' path
        import test_ray
        loader = functools.partial(test_ray.logged_loader, log)
    recipe = ray_engine.ModelRecipe(model, LoadOptions(device="cpu", dtype="float32"), loader)
    options = RunOptions(output_dir=output_dir, progress=False, batch_size=2,
                         formats=("captions.txt", "jsonl", "parquet"))
    pipeline, executor = ray_engine.pipeline_for(recipe, GenerationOptions(max_new_tokens=6), options,
                                                 engine)
    summary = pipeline.run([inputs], executor=executor)
    print(json.dumps(summary.as_dict()))
""")


def start_driver(tmp_path: Path, blip_dir: Path, inputs: Path, out: Path, address: str = "",
                 batches: Path | None = None) -> subprocess.Popen:
    """The DRIVER script, run with a `Logged` captioner writing to `batches` when given."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    log = open(tmp_path / f"driver-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - the child writes it
    return subprocess.Popen([sys.executable, str(script), str(blip_dir), str(inputs), str(out), address,
                             str(batches or "")], env=ray_env(), stdout=subprocess.PIPE, stderr=log,
                            text=True, start_new_session=True)


def wait_for_rows(out: Path, process: subprocess.Popen, at_least: int, timeout: float = 240) -> int:
    """Rows recorded in the store once there are `at_least`, or fail if the run ends or stalls first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        try:
            rows = len(recorded_paths(out))
        except sqlite3.Error:  # not created yet
            rows = 0
        if rows >= at_least:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"no {at_least} rows recorded in {timeout} s")


def end_process_tree(root: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM a process we started and then SIGKILL whatever of its tree is left, by pid."""
    try:
        tree = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if root.poll() is None:
        root.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_store(blip_dir, blip_fp32, many_photos, tmp_path):
    out = tmp_path / "ray"
    first = start_driver(tmp_path, blip_dir, many_photos, out)
    ours: list[psutil.Process] = []
    try:
        recorded = wait_for_rows(out, first, at_least=2)
        ours = psutil.Process(first.pid).children(recursive=True)
        first.send_signal(signal.SIGKILL)  # the driver, as an OOM killer or a lost laptop lid would
        first.wait()
        # Ray's agents outlive it by minutes; the GCS, the raylet and the workers must not
        working = [p for p in ours if not _is_agent(p)]
        _, left = psutil.wait_procs(working, timeout=60)
        assert not left, "the Ray a driver started dies with it"
    finally:
        end_process_tree(first)
        for process in ours:  # ours by pid, reparented once the driver died
            if process.is_running():
                process.kill()
    assert recorded < 24
    second = start_driver(tmp_path, blip_dir, many_photos, out)
    try:
        stdout, _ = second.communicate(timeout=400)
    finally:
        end_process_tree(second)
    assert second.returncode == 0, (tmp_path / "driver.py").read_text()
    summary = last_json(stdout)
    assert summary["skipped"] >= recorded and summary["skipped"] + summary["done"] == 24
    paths = recorded_paths(out)
    assert len(paths) == len(set(paths)) == 24
    Pipeline(blip_fp32, GEN, RunOptions(output_dir=tmp_path / "local", progress=False,
                                        formats=("captions.txt", "jsonl", "parquet"))).run([str(many_photos)])
    assert outputs(out) == outputs(tmp_path / "local")


def last_json(stdout: str) -> dict:
    """The driver's summary: its last JSON line (Ray copies its workers' log lines to stdout)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


def _is_agent(process: psutil.Process) -> bool:
    try:
        return process.name().endswith("Agent")
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the Ray head exited while starting"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the Ray head did not listen on {port} in {timeout} s")


@pytest.mark.slow
def test_two_nodes_on_one_machine_survive_a_killed_worker(blip_dir, blip_fp32, many_photos, tmp_path):
    ray_cli = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="ck-2n-")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
              "--object-store-memory=100000000"]
    logs = open(tmp_path / "nodes.log", "w")  # noqa: SIM115 - the nodes write it until the end
    nodes = [subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", f"--temp-dir={temp}",
                               "--include-dashboard=false", *common], env=ray_env(), stdout=logs,
                              stderr=subprocess.STDOUT, start_new_session=True)]
    driver = None
    try:
        wait_for_port(port, nodes[0])
        nodes.append(subprocess.Popen([ray_cli, "start", f"--address=127.0.0.1:{port}", *common],
                                      env=ray_env(), stdout=logs, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        out, batches = tmp_path / "ray", tmp_path / "batches.jsonl"
        driver = start_driver(tmp_path, blip_dir, many_photos, out, f"127.0.0.1:{port}", batches)
        wait_for_rows(out, driver, at_least=2)
        per_node = [actor_processes(psutil.Process(node.pid)) for node in nodes]
        assert [len(actors) for actors in per_node] == [1, 1], "one actor on each node"
        killed = kill_mid_batch(batches, lambda: [actor for actors in per_node for actor in actors])
        stdout, _ = driver.communicate(timeout=400)
        assert driver.returncode == 0, (tmp_path / "nodes.log").read_text()[-3000:]
    finally:
        for process in [driver, *nodes]:
            if process is not None:
                end_process_tree(process)
        shutil.rmtree(temp, ignore_errors=True)
    summary = last_json(stdout)
    assert summary["done"] == 24 and not summary["failed"]
    assert_retried(batches, *killed)
    paths = recorded_paths(out)
    assert len(paths) == len(set(paths)) == 24
    Pipeline(blip_fp32, GEN, RunOptions(output_dir=tmp_path / "local", progress=False,
                                        formats=("captions.txt", "jsonl", "parquet"))).run([str(many_photos)])
    assert outputs(out) == outputs(tmp_path / "local")
