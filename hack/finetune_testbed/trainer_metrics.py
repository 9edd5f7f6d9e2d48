"""The fake trainer's metrics: each running master pod serves a simulated run's /metrics.

kwok runs no containers, so nothing answers on a fake pod's address; the operator, which scrapes
the master pod's ``<podIP>:<metrics port>/metrics`` for ``status.progress``, would see no progress
at all. This loop (the optional component ``trainer-metrics``: ``hack/cluster up
--trainer-metrics``) serves it: the test bed's kwok nodes have pod CIDRs in 127.0.0.0/8, so a fake
pod's IP is an address of this machine, and for every master pod of a PyTorchJob that runs and
has passed the rendezvous (and every TrainJob's rank 0: the pod of completion index 0 of job
index 0 of its JobSet's replicated job ``node``, container ``node``) it serves the trainer's
**own** metrics (``finetune_trainer.metrics``: its registry, names and types) on that IP and the
pod's ``metrics`` port, fed by a simulated run:

- the run lasts the pod's run-duration (``testbed.finetune.dev/run-duration``, else the test
  bed's default) from the rendezvous, as the kwok Stage that ends the pod counts it: the first
  10% loads the model (no step yet; ``testbed.finetune.dev/load-duration``, a Go duration, sets
  it instead: a long run whose steps start at once), steps advance evenly over the next 80%,
  and the last 10% saves the final checkpoint and exports the model, so the last scrape before
  the pod ends sees every step;
- total steps: ``testbed.finetune.dev/total-steps`` if set, else the trainer config's
  ``maxSteps``, else 100 a epoch; tokens a step, the learning-rate schedule, the checkpoint and
  eval cadence and the ranks come from the trainer config in the job's ConfigMap;
- the loss falls from about ln(vocabulary) = 10.4 towards 1.1 with a little noise; step
  durations are the wall time a step takes here, so the operator's ETA is right;
- a hang: ``testbed.finetune.dev/hang-after`` stops the steps for good after that many steps
  (``"5"``) or that long after the rendezvous (a Go duration, ``"40s"``), as a trainer stuck in
  a collective would: the pod keeps running (for its run-duration) and serves the same step,
  with no further checkpoint. On the replica template, every pod the PyTorchJob re-creates
  hangs the same way;
- a resume: as the real trainer resumes from the newest complete checkpoint in its checkpoint
  storage, a master pod of a job whose earlier master pod saved a checkpoint (same namespace, job
  and ``checkpoint.dir``, while this loop runs) goes on from that checkpoint's step: its run
  reports that step (``finetune_train_step``) and the checkpoint, and counts only its own steps.

It stops serving a pod when the pod ends, is deleted or its IP leaves the test bed's pod network
(a test that points the pod elsewhere serves its own). ``testbed.finetune.dev/trainer-metrics:
"false"`` on a pod keeps it silent (nothing listens: the operator's scrape is refused at once);
``"unresponsive"`` stands in for a trainer that takes the connection and never answers (stuck
in a collective with its metrics thread starved, or a network path that drops replies): a
socket listens on the pod's address and port and never accepts, so a scrape waits for its
timeout. This module needs prometheus_client and pydantic (the
trainer's metrics and config modules): ``up`` starts it with the Python that runs ``hack/cluster``
and refuses ``--trainer-metrics`` when that Python lacks them; the rest of the package stays
standard library only.
"""

from __future__ import annotations

import calendar
import ipaddress
import math
import random
import re
import socket
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer import metrics
from finetune_trainer.config import TrainerConfig
from finetune_trainer.names import (
    COMPLETION_INDEX_LABEL,
    CONTAINER,
    JOB_INDEX_LABEL,
    JOB_NAME_LABEL,
    JOBSET_NAME_LABEL,
    METRICS_PORT,
    REPLICA_TYPE_LABEL,
    REPLICATED_JOB_LABEL,
    TRAINJOB_CONTAINER,
)

from .kubeapi import Api
from .log import log
from .rendezvous import ANNOTATION as RENDEZVOUS
from .state import load

RUN_DURATION = "testbed.finetune.dev/run-duration"
TOTAL_STEPS = "testbed.finetune.dev/total-steps"
LOAD_DURATION = "testbed.finetune.dev/load-duration"
HANG_AFTER = "testbed.finetune.dev/hang-after"
OPT_OUT = "testbed.finetune.dev/trainer-metrics"
CONFIG_FILE = "config.json"
CONFIG_VOLUME = "trainer-config"  # the operator's volume of the job's ConfigMap
#: A TrainJob's rank 0: the first pod of the first Job of its JobSet's replicated job ``node``.
TRAINJOB_RANK0 = {REPLICATED_JOB_LABEL: "node", JOB_INDEX_LABEL: "0", COMPLETION_INDEX_LABEL: "0"}
HEARTBEAT = "trainer-metrics.heartbeat"
INTERVAL_SECONDS = 1.0
STEPS_PER_EPOCH = 100
LOAD, TRAIN = 0.1, 0.8  # fractions of the run: loading, then steps; the rest saves and exports
INITIAL_LOSS, FINAL_LOSS = 10.4, 1.1

Obj = Mapping[str, Any]
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds of a Go duration (``"30s"``, ``"1m30s"``, ``"500ms"``), as kwok reads it."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a Go duration (e.g. 30s, 1m30s)")
    return sum(float(n) * _UNIT[u] for n, u in parts)


@dataclass(frozen=True)
class Schedule:
    """A simulated run: what it has done ``elapsed`` seconds after the rendezvous (pure)."""

    run_seconds: float
    total_steps: int
    tokens_per_step: int = 64 * 2048
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    checkpoint_every: int = 500
    eval_every: int | None = None
    ranks: int = 1
    seed: int = 42
    load_seconds: float | None = None  # None: LOAD of the run

    @classmethod
    def of(
        cls,
        config: TrainerConfig | None,
        run_seconds: float,
        total: int | None,
        load_seconds: float | None = None,
    ) -> Schedule:
        """From the job's trainer config (None: defaults); ``total`` overrides its steps."""
        if config is None:
            return cls(run_seconds, total or STEPS_PER_EPOCH, load_seconds=load_seconds)
        sched = config.schedule
        steps = total or sched.max_steps or (sched.epochs or 1) * STEPS_PER_EPOCH
        packed = 0.95 if config.data.packing else 0.6  # the share of real (non-pad) tokens
        return cls(
            run_seconds=run_seconds,
            total_steps=steps,
            tokens_per_step=int(sched.global_batch_size * config.data.max_seq_length * packed),
            learning_rate=config.optim.learning_rate,
            warmup_steps=config.optim.warmup_steps,
            lr_scheduler=config.optim.lr_scheduler,
            checkpoint_every=config.checkpoint.every_steps,
            eval_every=sched.eval_every_steps,
            ranks=config.hardware.procs_per_node,
            seed=sched.seed,
            load_seconds=load_seconds,
        )

    @property
    def step_seconds(self) -> float:
        return self.run_seconds * TRAIN / self.total_steps

    def step_at(self, elapsed: float) -> int:
        """Optimizer steps done ``elapsed`` seconds into the run."""
        if self.run_seconds <= 0:
            return self.total_steps
        loading = self.run_seconds * LOAD if self.load_seconds is None else self.load_seconds
        done = (elapsed - loading) / self.step_seconds
        return max(0, min(self.total_steps, math.floor(done)))

    def hang_step(self, hang: Hang | None) -> int | None:
        """The step a run that hangs as ``hang`` says stops at (None: it does not hang)."""
        if hang is None:
            return None
        if hang.steps is not None:
            return min(hang.steps, self.total_steps)
        return self.step_at(hang.seconds or 0.0)

    def finished(self, elapsed: float) -> bool:
        """Training is over (the final checkpoint and export are under way)."""
        return elapsed >= self.run_seconds * (LOAD + TRAIN)

    def loss(self, step: int) -> float:
        """Falls from about ln(32768) towards FINAL_LOSS, with a little noise (seeded)."""
        p = step / self.total_steps
        base = FINAL_LOSS + (INITIAL_LOSS - FINAL_LOSS) * math.exp(-5.0 * p)
        noise = random.Random(f"{self.seed}:{step}").uniform(-0.02, 0.02)
        return base * (1.0 + noise)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * step / self.warmup_steps
        if self.lr_scheduler == "constant":
            return self.learning_rate
        span = max(1, self.total_steps - self.warmup_steps)
        p = min(1.0, (step - self.warmup_steps) / span)
        if self.lr_scheduler == "linear":
            return self.learning_rate * (1.0 - p)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * p))

    def grad_norm(self, step: int) -> float:
        return 0.4 + 2.0 * math.exp(-3.0 * step / self.total_steps)

    def checkpoint_step(self, step: int, finished: bool) -> int:
        """The step of the latest complete checkpoint (the final one once training is over)."""
        if finished and step == self.total_steps:
            return step
        return step // self.checkpoint_every * self.checkpoint_every


@dataclass(frozen=True)
class Hang:
    """When a simulated run stops stepping: after ``steps`` steps, or ``seconds`` after the
    rendezvous (one of the two)."""

    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> Hang:
        """``"5"`` (steps) or a Go duration (``"40s"``); ValueError for anything else."""
        text = text.strip()
        if text.isdigit():
            return cls(steps=int(text))
        try:
            return cls(seconds=parse_duration(text))
        except ValueError:
            raise ValueError(
                f"{HANG_AFTER}: {text!r} is neither a step count (5) nor a Go duration (40s)"
            ) from None


@dataclass(frozen=True)
class MasterPod:
    """What the loop needs of a training pod (parsed once from the API's JSON)."""

    uid: str
    namespace: str
    name: str
    master: bool
    running: bool
    ip: str
    port: int | None  # the container port named ``metrics``
    joined_at: float | None  # the rendezvous, Unix time
    run_seconds: float | None  # the run-duration annotation
    total_steps: int | None
    config_map: str | None
    load_seconds: float | None
    silent: bool
    hang: Hang | None = None
    unresponsive: bool = False  # listens and never answers
    job: str = ""  # the PyTorchJob's name (a TrainJob's: its JobSet's, the TrainJob's own)

    @classmethod
    def of(cls, pod: Obj) -> MasterPod:
        meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
        notes = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        trainjob = JOB_NAME_LABEL not in labels and JOBSET_NAME_LABEL in labels
        name = TRAINJOB_CONTAINER if trainjob else CONTAINER
        container: Obj = next(
            (c for c in spec.get("containers") or [] if c.get("name") == name), {}
        )
        port = next(
            (
                p.get("containerPort")
                for p in container.get("ports") or []
                if p.get("name") == "metrics"
            ),
            None,
        )
        joined = notes.get(RENDEZVOUS)
        run = notes.get(RUN_DURATION)
        total = notes.get(TOTAL_STEPS)
        load = notes.get(LOAD_DURATION)
        maps = [v for v in spec.get("volumes") or [] if v.get("configMap")]
        maps.sort(key=lambda v: v.get("name") != CONFIG_VOLUME)  # the trainer's config first
        volumes = [v["configMap"]["name"] for v in maps]
        if trainjob:
            master = all(str(labels.get(k)) == v for k, v in TRAINJOB_RANK0.items())
        else:
            master = str(labels.get(REPLICA_TYPE_LABEL, "")).lower() == "master"
        return cls(
            uid=str(meta.get("uid", "")),
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            master=master,
            running=status.get("phase") == "Running" and not meta.get("deletionTimestamp"),
            ip=str(status.get("podIP") or ""),
            port=int(port) if port else None,
            joined_at=calendar.timegm(time.strptime(joined, "%Y-%m-%dT%H:%M:%SZ"))
            if joined
            else None,
            run_seconds=parse_duration(run) if run else None,
            total_steps=int(total) if total else None,
            load_seconds=parse_duration(load) if load else None,
            config_map=volumes[0] if volumes else None,
            silent=str(notes.get(OPT_OUT, "")).lower() == "false",
            unresponsive=str(notes.get(OPT_OUT, "")).lower() == "unresponsive",
            hang=Hang.parse(str(notes[HANG_AFTER])) if notes.get(HANG_AFTER) else None,
            job=str(labels.get(JOBSET_NAME_LABEL if trainjob else JOB_NAME_LABEL, "")),
        )

    def serves(self, network: str) -> bool:
        """A running master past the rendezvous, on an address of the test bed's pod network."""
        if not (self.master and self.running and self.joined_at and self.ip) or self.silent:
            return False
        try:
            return ipaddress.ip_address(self.ip) in ipaddress.ip_network(network)
        except ValueError:
            return False


@dataclass
class Run:
    """One pod's simulated run, served on its address."""

    pod: MasterPod
    schedule: Schedule
    trainer: metrics.TrainerMetrics
    done: int = 0  # the run's step so far (from ``start``)
    saved: int = 0  # the checkpoint step reported so far
    evaluated: set[int] = field(default_factory=set)
    start: int = 0  # the checkpoint step it resumed from (0: a fresh run)

    def __post_init__(self) -> None:
        self.done = self.saved = self.start
        self.trainer.step.set(self.start)
        self.trainer.total_steps.set(self.schedule.total_steps)
        self.trainer.progress.set(self.start / self.schedule.total_steps)
        if self.start:
            self.trainer.checkpoint_last_step.set(self.start)

    def advance(self, now: float) -> None:
        """Bring the metrics to what the run has done by ``now``."""
        s, m = self.schedule, self.trainer
        elapsed = now - (self.pod.joined_at or now)
        step = min(s.total_steps, self.start + s.step_at(elapsed))
        finished = s.finished(elapsed)
        stuck = s.hang_step(self.pod.hang)
        if stuck is not None and stuck < s.total_steps:  # hung: no more steps, so no final save
            step = min(step, stuck)
        for k in range(self.done + 1, step + 1):
            m.steps.inc()
            m.tokens.inc(s.tokens_per_step)
            m.step_duration.observe(s.step_seconds)
            m.dataloader_wait.observe(0.002)
            if s.eval_every and k % s.eval_every == 0:
                m.eval_loss.set(s.loss(k) * 1.05)
        if step > self.done:
            self.done = step
            m.loss.set(s.loss(step))
            m.learning_rate.set(s.lr(step))
            m.grad_norm.set(s.grad_norm(step))
            m.mfu.set(0.38 + random.Random(step).uniform(-0.02, 0.02))
            m.progress.set(step / s.total_steps)
            m.step.set(step)
            for rank in range(s.ranks):
                m.memory.labels(str(rank)).set(61.5 * 2**30)
        saved = s.checkpoint_step(step, finished)
        if saved > self.saved:
            self.saved = saved
            m.checkpoint_save.observe(max(0.1, s.run_seconds * 0.02))
            m.checkpoint_last_step.set(saved)
            m.checkpoint_last_save.set(now)


def trainer_config(api: Api, pod: MasterPod) -> TrainerConfig | None:
    """The trainer config the operator put in the job's ConfigMap (None if absent or invalid)."""
    if not pod.config_map:
        return None
    cm = api.get(f"/api/v1/namespaces/{pod.namespace}/configmaps/{pod.config_map}") or {}
    text = (cm.get("data") or {}).get(CONFIG_FILE)
    if not text:
        return None
    try:
        return TrainerConfig.model_validate_json(text)
    except ValueError as e:
        log(f"trainer-metrics: {pod.namespace}/{pod.config_map}: not a trainer config ({e})")
        return None


class Server:
    """The runs being served, kept in step with the cluster's master pods."""

    def __init__(self, api: Api, network: str, default_run_seconds: float) -> None:
        self.api = api
        self.network = network
        self.default_run_seconds = default_run_seconds
        self.runs: dict[str, Run] = {}
        #: (namespace, job, checkpoint dir) -> the newest checkpoint step its runs saved.
        self.checkpoints: dict[tuple[str, str, str], int] = {}
        self.keys: dict[str, tuple[str, str, str]] = {}  # uid -> its run's checkpoint key
        self.refused: dict[str, str] = {}  # uid -> why it cannot be served (logged once)
        self.mute: dict[str, tuple[MasterPod, socket.socket]] = {}  # uid -> a listener, no answer

    def step(self, now: float) -> None:
        items = []
        for query in (
            f"{JOB_NAME_LABEL},{REPLICA_TYPE_LABEL}=master",
            ",".join([JOBSET_NAME_LABEL, *(f"{k}={v}" for k, v in TRAINJOB_RANK0.items())]),
        ):
            selector = urllib.parse.quote(query)
            got = self.api.get(f"/api/v1/pods?labelSelector={selector}") or {}
            items += got.get("items", [])
        live = {p.uid: p for p in map(MasterPod.of, items) if p.serves(self.network)}
        for uid in [u for u, r in self.runs.items() if u not in live or live[u].ip != r.pod.ip]:
            self.stop(uid)
        for uid in [u for u, (p, _) in self.mute.items() if u not in live or live[u].ip != p.ip]:
            self.mute.pop(uid)[1].close()
        for uid, pod in live.items():
            if pod.unresponsive:
                if uid not in self.mute and uid not in self.refused:
                    self.listen(pod)
                continue
            if uid not in self.runs and uid not in self.refused:
                self.start(pod)
            if uid in self.runs:
                run = self.runs[uid]
                run.advance(now)
                key = self.keys.get(uid)
                if key is not None and run.saved > self.checkpoints.get(key, 0):
                    self.checkpoints[key] = run.saved

    def start(self, pod: MasterPod) -> None:
        config = trainer_config(self.api, pod)
        run_seconds = pod.run_seconds if pod.run_seconds is not None else self.default_run_seconds
        schedule = Schedule.of(config, run_seconds, pod.total_steps, pod.load_seconds)
        port = pod.port or (config.metrics.port if config else METRICS_PORT)
        trainer = metrics.create(torch_version="testbed", transformers_version="testbed")
        try:
            metrics.serve(trainer, port, addr=pod.ip)
        except OSError as e:
            self.refused[pod.uid] = str(e)
            log(f"trainer-metrics: {pod.namespace}/{pod.name}: cannot serve {pod.ip}:{port}: {e}")
            return
        start = 0
        if config is not None and config.checkpoint.dir and config.checkpoint.resume == "auto":
            key = (pod.namespace, pod.job, config.checkpoint.dir)
            self.keys[pod.uid] = key
            start = min(self.checkpoints.get(key, 0), schedule.total_steps)
        self.runs[pod.uid] = Run(pod, schedule, trainer, start=start)
        resumed = f", resumed at step {start}" if start else ""
        log(
            f"trainer-metrics: {pod.namespace}/{pod.name} on http://{pod.ip}:{port}/metrics: "
            f"{schedule.total_steps} steps in {run_seconds:g}s{resumed}"
        )

    def listen(self, pod: MasterPod) -> None:
        """Take connections on the pod's metrics address and never answer (the kernel completes
        the handshakes up to the backlog; nobody accepts or reads)."""
        port = pod.port or METRICS_PORT
        try:
            sock = socket.create_server((pod.ip, port), backlog=1)
        except OSError as e:
            self.refused[pod.uid] = str(e)
            log(
                f"trainer-metrics: {pod.namespace}/{pod.name}: "
                f"cannot listen on {pod.ip}:{port}: {e}"
            )
            return
        self.mute[pod.uid] = (pod, sock)
        log(f"trainer-metrics: {pod.namespace}/{pod.name} on {pod.ip}:{port}: never answers")

    def stop(self, uid: str) -> None:
        run = self.runs.pop(uid)
        self.keys.pop(uid, None)
        run.trainer.close()
        log(f"trainer-metrics: {run.pod.namespace}/{run.pod.name} stopped at step {run.done}")

    def close(self) -> None:
        for uid in list(self.runs):
            self.stop(uid)
        for _, sock in self.mute.values():
            sock.close()
        self.mute.clear()


def run(state_dir: Path, default_run_seconds: float) -> int:
    """Loop until killed (``down`` stops it with the other components)."""
    st = load(state_dir)
    if st is None or not st.pod_network:
        log(f"trainer-metrics: no test bed with a pod network in {state_dir}")
        return 1
    server = Server(Api(st.server, st.admin_token, st.ca), st.pod_network, default_run_seconds)
    heartbeat = state_dir / HEARTBEAT
    log(f"trainer-metrics: serving the master pods of {st.pod_network}")
    try:
        while True:
            try:
                server.step(time.time())
            except (KeyError, ValueError, TypeError) as e:  # a malformed object: skip this pass
                log(f"trainer-metrics: {type(e).__name__}: {e}")
            heartbeat.touch()
            time.sleep(INTERVAL_SECONDS)
    finally:
        server.close()


def alive(state_dir: Path, within: float = 10.0) -> bool:
    """The loop has run a pass in the last ``within`` seconds."""
    try:
        return time.time() - (state_dir / HEARTBEAT).stat().st_mtime < within
    except OSError:
        return False
