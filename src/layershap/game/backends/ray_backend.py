"""Masked evaluations on a Ray cluster: `--backend ray [--ray-address ADDR]`.

Each worker is a Ray actor that loads the model once, from the same spec the driver was given (model name
or directory, dtype, trust_remote_code), on its own GPU when the cluster has GPUs and on CPU threads
otherwise. The driver sends it the calibration tokens (once, through the object store), the game's utility
and granularity (`game_options`: the utility decides the measured loss, NLL or KL from the dense model, and a
worker measuring KL takes its own dense reference once per windows) and batches of keep-masks; the worker
returns one measured loss per mask. Only the driver writes the evaluation store.

Before any mask is measured every worker reports its model fingerprint and measurement context (which
covers the windows and the dtype); a worker that loaded something else is refused, so the store never
mixes measurements. A worker that dies is restarted by Ray and its unfinished batch is retried on it
(`max_restarts` / `max_task_retries`); other workers go on meanwhile. Results committed before a failure
stay in the store, so a failed run resumes like any other.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import threading
from collections import deque
from collections.abc import Iterator

import numpy as np

from layershap.errors import LayershapError
from layershap.game.backends.spec import ModelSpec

ADDRESS_CHECK_SECONDS = 3.0  # a closed port or unknown host is reported within this
JOIN_TIMEOUT_SECONDS = 30.0  # an open port that is not a Ray head (override: LAYERSHAP_RAY_JOIN_TIMEOUT)
DEFAULT_GCS_PORT = 6379
MAX_CPU_WORKERS = 4  # each worker holds a copy of the model; CPU workers split the cores between them
IN_FLIGHT_PER_WORKER = 2  # one batch running, one queued, so a worker never waits for the driver
MAX_MASKS_PER_BATCH = 16


def import_ray():
    # Ray's C++ core logs every failed connection attempt to stderr and reports usage over the network
    # by default; neither belongs in a layershap run.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    try:
        import ray
    except ImportError:
        raise LayershapError("--backend ray needs Ray, which is not installed: pip install 'layershap[ray]'") \
            from None
    return ray


def host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address such as 10.0.0.5:6379, ray://head:10001 or [::1]:6379; None for the
    special addresses `auto` and `local`, which Ray resolves itself."""
    bare = address.strip()
    if bare in ("auto", "local"):
        return None
    bare = bare.split("://", 1)[-1].rstrip("/")
    if bare.startswith("["):  # IPv6 literal
        host, _, rest = bare[1:].partition("]")
        port = rest.lstrip(":")
    elif bare.count(":") == 1:
        host, port = bare.split(":")
    else:
        host, port = bare, ""
    if not host:
        raise LayershapError(f"--ray-address {address!r} names no host; give HOST:PORT, e.g. 10.0.0.5:6379")
    try:
        return host, int(port) if port else DEFAULT_GCS_PORT
    except ValueError:
        raise LayershapError(f"--ray-address {address!r} has no valid port; give HOST:PORT, e.g. "
                             "10.0.0.5:6379") from None


def check_address(address: str, timeout: float = ADDRESS_CHECK_SECONDS) -> None:
    """Refuse at once an address where nothing listens (Ray itself would retry for minutes)."""
    target = host_and_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise LayershapError(f"no Ray cluster answers at {address} ({reason}); start one with "
                             "`ray start --head` there, or check --ray-address") from None


def game_options(game) -> dict:
    """What a worker needs besides the windows and batch size to build the driver's game."""
    return {"utility": game.utility.name, "granularity": getattr(game, "granularity", "block")}


class MaskWorker:
    """Runs inside a Ray actor: one model, any number of calibration windows, batches of masks."""

    def __init__(self, spec: dict, threads: int, crash_once: str | None = None):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        self.error: str | None = None
        self.crash_once = crash_once
        self.games: dict[str, object] = {}
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        try:
            from layershap.models.load import load_model

            self.model, _ = load_model(spec["name"], dtype=spec["dtype"], device=device,
                                       trust_remote_code=spec["trust_remote_code"])
        except LayershapError as exc:  # reported by `identity`, so the driver prints one line
            self.error = f"a Ray worker could not load the model: {exc}"

    def _game(self, key: str, tokens, batch_size: int, options: dict | None = None):
        from layershap.game.layer_game import LayerGame

        if self.error:
            raise LayershapError(self.error)
        if key not in self.games:
            self.games[key] = LayerGame(self.model, tokens, batch_size=batch_size, **(options or {}))
        return self.games[key]

    def identity(self, key: str, tokens, batch_size: int, options: dict | None = None) -> dict:
        from layershap.game.context import context_description, measurement_context, model_fingerprint

        game = self._game(key, tokens, batch_size, options)
        if not hasattr(self, "fingerprint"):
            self.fingerprint = model_fingerprint(self.model)
        return {"model_fp": self.fingerprint, "context": measurement_context(game),
                "about": context_description(game), "pid": os.getpid()}

    def evaluate(self, key: str, tokens, masks: np.ndarray, batch_size: int,
                 options: dict | None = None) -> list[tuple[float, float]]:
        """(measured loss, seconds) of every mask, in the order given."""
        from layershap.game.backends.local import measure

        game = self._game(key, tokens, batch_size, options)
        results: list[tuple[float, float]] = [(float("nan"), 0.0)] * len(masks)
        for row, nll, seconds in measure(game, np.asarray(masks, dtype=bool)):
            results[row] = (nll, seconds)
            self._maybe_crash()
        return results

    def _maybe_crash(self) -> None:
        """Fault injection for tests: the first worker to get here dies, mid-batch, once per marker file."""
        if self.crash_once:
            try:
                with open(self.crash_once, "x"):
                    pass
            except FileExistsError:
                return
            os._exit(1)


class RayBackend:
    """Evaluate masks on Ray actors. Joins `address` now (or the cluster in $RAY_ADDRESS, or starts a local
    one on first use); one worker per GPU, or up to MAX_CPU_WORKERS sharing the CPUs, unless `workers`."""

    name = "ray"

    def __init__(self, spec: ModelSpec, *, address: str | None = None, workers: int | None = None,
                 masks_per_batch: int | None = None, max_retries: int = 3, crash_once: str | None = None):
        self.ray = import_ray()
        self.spec = spec
        self.address = address
        self.workers_wanted = workers
        self.masks_per_batch = masks_per_batch
        self.max_retries = max_retries
        # Fault injection for tests: a marker file path; the first worker to finish a mask while it does
        # not exist creates it and dies mid-batch.
        self.crash_once = crash_once or os.environ.get("LAYERSHAP_RAY_CRASH_ONCE") or None
        self.actors: list = []
        self.checked: set[str] = set()
        self.tokens: dict[str, object] = {}
        self._owns_ray = False
        self._temp_dir: str | None = None
        if address:
            check_address(address)
            self._connect()

    # -- cluster ------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        import logging

        ray = self.ray
        if ray.is_initialized():
            return
        options = {"logging_level": logging.ERROR, "log_to_driver": False}
        if self.address:
            self._join(self.address, options)
        else:
            self._temp_dir = tempfile.mkdtemp(prefix="lsray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            ray.init(include_dashboard=False, _temp_dir=self._temp_dir, **options)
        self._owns_ray = True

    def _join(self, address: str, options: dict) -> None:
        """ray.init in a thread, given up after a timeout: Ray retries a wrong address for minutes."""
        outcome: dict = {}

        def join():
            try:
                self.ray.init(address=address, **options)
                outcome["ok"] = True
            except Exception as exc:  # noqa: BLE001 - reported below as one line
                outcome["error"] = exc

        timeout = float(os.environ.get("LAYERSHAP_RAY_JOIN_TIMEOUT", JOIN_TIMEOUT_SECONDS))
        thread = threading.Thread(target=join, daemon=True, name="layershap-ray-join")
        thread.start()
        thread.join(timeout)
        if "error" in outcome:
            first = str(outcome["error"]).strip().splitlines()[0] if str(outcome["error"]).strip() else ""
            raise LayershapError(f"could not join the Ray cluster at {address}: {first or type(outcome['error']).__name__}")
        if "ok" not in outcome:
            raise LayershapError(f"{address} accepts connections but no Ray cluster answered within {timeout:.0f} s; "
                                 "check --ray-address (the head's GCS port, 6379 by default)")

    def _start_workers(self, dtype: str) -> None:
        ray = self.ray
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if self.spec.device != "cpu" else 0
        cpus = max(1, int(resources.get("CPU", 1)))
        if gpus:
            count, threads, per_actor = self.workers_wanted or gpus, 1, {"num_gpus": 1, "num_cpus": 1}
        else:
            count = self.workers_wanted or min(cpus, MAX_CPU_WORKERS)
            threads = max(1, cpus // count)
            per_actor = {"num_cpus": threads}
        spec = {**self.spec.to_dict(), "dtype": dtype}
        worker = ray.remote(MaskWorker).options(max_restarts=self.max_retries, max_task_retries=self.max_retries,
                                                **per_actor)
        self.actors = [worker.remote(spec, threads, self.crash_once) for _ in range(count)]

    def _prepare(self, game, context: str, model_fp: str) -> None:
        """Workers started, the windows sent, and every worker shown to measure what the driver measures."""
        ray = self.ray
        if not self.actors:
            self._connect()
            self._start_workers(str(next(game.model.parameters()).dtype).removeprefix("torch."))
        if context in self.checked:
            return
        self.tokens[context] = ray.put(game.tokens.cpu())
        try:
            reports = self._get([a.identity.remote(context, self.tokens[context], game.batch_size,
                                                   game_options(game)) for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LayershapError(f"a Ray worker died while loading the model ({cause[:200]})") from None
        for report in reports:
            if report["model_fp"] != model_fp:
                raise LayershapError(f"a Ray worker loaded another model (fingerprint {report['model_fp']}, the "
                                     f"driver's is {model_fp}): every node must see the same --model")
            if report["context"] != context:
                from layershap.game.context import context_description, context_differences

                differ = ", ".join(context_differences(context_description(game), report.get("about")))
                raise LayershapError(f"a Ray worker measures under other conditions than the driver ({differ}), "
                                     "so its NLLs could not be stored under the driver's context; run the driver "
                                     "on the workers' device, dtype and library versions (--device, --dtype)")
        self.checked.add(context)

    def _get(self, refs):
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, LayershapError):
                raise LayershapError(str(exc.cause)) from None
            raise

    # -- evaluation ---------------------------------------------------------------------------------------
    def batches(self, masks: np.ndarray) -> list[list[int]]:
        """Rows of `masks` in batches, each a run of masks sharing leading blocks where that can be used."""
        count = len(masks)
        size = self.masks_per_batch or max(1, min(MAX_MASKS_PER_BATCH,
                                                  math.ceil(count / (4 * max(1, len(self.actors))))))
        try:
            from layershap.game.prefix import visiting_order

            order = [int(i) for i in visiting_order(masks)]
        except ImportError:
            order = list(range(count))
        return [order[start:start + size] for start in range(0, count, size)]

    def evaluate(self, game, masks: np.ndarray, *, context: str, model_fp: str) -> Iterator[tuple[int, float, float]]:
        masks = np.asarray(masks, dtype=bool)
        if not len(masks):
            return
        self._prepare(game, context, model_fp)
        ray = self.ray
        tokens = self.tokens[context]
        options = game_options(game)
        queue = deque(self.batches(masks))
        running: dict = {}  # ObjectRef -> (actor index, batch)
        load = [0] * len(self.actors)
        alive = [True] * len(self.actors)
        lost: dict[tuple, int] = {}  # batch -> workers it has outlived
        done = 0
        while queue or running:
            for index, actor in enumerate(self.actors):
                while alive[index] and queue and load[index] < IN_FLIGHT_PER_WORKER:
                    batch = queue.popleft()
                    ref = actor.evaluate.remote(context, tokens, masks[batch], game.batch_size, options)
                    running[ref] = (index, batch)
                    load[index] += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                index, batch = running.pop(ref)
                load[index] -= 1
                try:
                    results = self._get(ref)
                except ray.exceptions.RayActorError as exc:
                    # Ray has already restarted this worker and retried the batch as often as allowed: give
                    # the worker up and the batch to the others, unless it keeps killing workers.
                    alive[index] = False
                    lost[tuple(batch)] = lost.get(tuple(batch), 0) + 1
                    if not any(alive) or lost[tuple(batch)] > 1:
                        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        raise LayershapError(
                            f"Ray workers kept dying on a batch of {len(batch)} masks ({sum(not a for a in alive)} of "
                            f"{len(alive)} workers lost, each restarted up to {self.max_retries} times); the {done} "
                            f"masks measured before are stored, so rerunning resumes from them ({cause[:160]})"
                        ) from None
                    queue.appendleft(batch)
                    continue
                for position, (nll, seconds) in zip(batch, results):
                    done += 1
                    yield position, float(nll), float(seconds)

    def close(self) -> None:
        ray = self.ray
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor)
        self.actors, self.checked, self.tokens = [], set(), {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
