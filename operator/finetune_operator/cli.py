"""The ``finetune`` command (also installed as ``kubectl-finetune``, so ``kubectl finetune`` works).

Thin: it reads files, calls the pure modules and prints. Exit codes: 0 fine, 1 the input is
invalid, 2 the command could not run (unreadable file, bad arguments).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from finetune_operator import __version__, api, crd, kubeyaml
from finetune_operator.plan import GPU_TYPE_FROM_NODES, plan_config, plan_job, planning_problem
from finetune_operator.spec import FineTuneJobSpec
from finetune_operator.translate import to_trainer_config
from finetune_trainer.planner import ModelConfigError, ModelFacts, PlanInfeasible, format_table

if TYPE_CHECKING:
    from finetune_operator.kube import Kube

app = typer.Typer(
    name="finetune",
    help="Fine-tune LLMs on Kubernetes from one FineTuneJob.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Document:
    """One YAML document from a file: where it came from, and its content."""

    label: str
    content: Any


class UnreadableError(Exception):
    """A file that cannot be read or is not YAML."""


def load_documents(path: str) -> list[Document]:
    """Every YAML document in ``path`` (``-`` reads standard input), read as kubectl reads it
    (so ``learningRate: 2e-5`` is the number the API server refuses, not a string)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UnreadableError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        docs = kubeyaml.load_all(text)
    except kubeyaml.NotJSONError as exc:
        raise UnreadableError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UnreadableError(f"{path}{where}: not valid YAML: {problem}") from None
    if len(docs) == 1:
        return [Document(path, docs[0])]
    return [Document(f"{path}#{i + 1}", d) for i, d in enumerate(docs)]


def _is_other_kind(content: Any) -> bool:
    return isinstance(content, dict) and content.get("kind") not in (None, api.KIND)


@app.command()
def validate(
    files: Annotated[list[str], typer.Argument(help="FineTuneJob YAML files ('-' for stdin).")],
) -> None:
    """Check FineTuneJobs against the rules the API server enforces (schema and CEL), then
    against the planner: a job no plan fits is refused with what would fit, as the operator would.

    Prints one line per problem with its field path; exits 1 if any document is invalid.
    """
    invalid = unreadable = 0
    for path in files:
        try:
            documents = load_documents(path)
        except UnreadableError as exc:
            err.print(f"[red]error[/]: {escape(str(exc))}")
            unreadable += 1
            continue
        for doc in documents:
            if _is_other_kind(doc.content):
                out.print(
                    f"[dim]{escape(doc.label)}: skipped ({escape(str(doc.content.get('kind')))})[/]"
                )
                continue
            problems = api.validate_document(doc.content)
            if not problems:  # valid, so it parses: the planner's verdict, offline
                planned = planning_problem(api.parse(doc.content).spec)
                problems = [planned] if planned else []
            if problems:
                invalid += 1
                for problem in problems:
                    out.print(f"[red]✗[/] {escape(doc.label)}: {escape(str(problem))}")
            else:
                name = doc.content.get("metadata", {}).get("name", "")
                out.print(f"[green]✓[/] {escape(doc.label)}: valid FineTuneJob {escape(str(name))}")
    if unreadable:
        raise typer.Exit(2)
    if invalid:
        raise typer.Exit(1)


def load_job(path: str) -> api.FineTuneJob:
    """The one FineTuneJob in ``path``, or exit with every problem printed."""
    try:
        documents = [d for d in load_documents(path) if not _is_other_kind(d.content)]
    except UnreadableError as exc:
        err.print(f"[red]error[/]: {escape(str(exc))}")
        raise typer.Exit(2) from None
    if len(documents) != 1:
        err.print(f"[red]error[/]: {escape(path)} holds {len(documents)} FineTuneJobs; give one")
        raise typer.Exit(2)
    try:
        return api.parse(documents[0].content)
    except api.SpecError as exc:
        for problem in exc.problems:
            err.print(f"[red]✗[/] {escape(documents[0].label)}: {escape(str(problem))}")
        raise typer.Exit(1) from None


def _no_trainer(exc: ImportError) -> NoReturn:
    """Exit 2: a command that runs trainer code on a machine without the trainer extra."""
    err.print(
        f"[red]error[/]: the trainer is not installed here ({escape(str(exc))}); "
        "install it with: pip install 'finetune-operator[trainer]'"
    )
    raise typer.Exit(2) from None


def load_model_config(path: Path, name: str) -> ModelFacts:
    """The model's shape from a Hugging Face config.json; exits 2 (unreadable) or 1 (unusable)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        err.print(f"[red]error[/]: {escape(str(path))}: cannot read: {escape(str(exc.strerror))}")
        raise typer.Exit(2) from None
    except json.JSONDecodeError as exc:
        err.print(f"[red]✗[/] {escape(str(path))}: not JSON: {escape(str(exc))}")
        raise typer.Exit(1) from None
    if not isinstance(cfg, dict):
        err.print(f"[red]✗[/] {escape(str(path))}: a config.json is a JSON object")
        raise typer.Exit(1)
    try:
        return ModelFacts.from_hf_config(cfg, name=name)
    except ModelConfigError as exc:
        err.print(f"[red]✗[/] {escape(str(path))}: {escape(str(exc))}")
        raise typer.Exit(1) from None


@app.command()
def plan(
    file: Annotated[str, typer.Argument(help="A FineTuneJob YAML file.")],
    model_config: Annotated[
        Path | None,
        typer.Option(
            help="The model's config.json, for a model outside the planner's offline catalog "
            "(a private or new Hub repo, a folder on a PVC): plan it without reading the Hub."
        ),
    ] = None,
) -> None:
    """Show the parallelism plan the operator would choose, with the runners-up.

    Exits 1 when no plan fits, with what would (more GPUs, LoRA, shorter sequences).
    """
    job = load_job(file)
    facts = load_model_config(model_config, job.spec.model.source) if model_config else None
    res = job.spec.resources
    out.print(
        f"[bold]{escape(job.name)}[/]: {escape(job.spec.model.source)} {job.spec.method.type} "
        f"fine-tune, seq {job.spec.dataset.max_seq_length}, global batch "
        f"{job.spec.hyperparameters.global_batch_size}, on {res.num_nodes} x {res.gpus_per_node} "
        f"{res.gpu_type or 'GPUs of the type the nodes show'}"
    )
    if res.gpu_type is None:
        out.print(GPU_TYPE_FROM_NODES)
        return
    try:
        result = plan_job(job.spec, facts)
    except PlanInfeasible as exc:
        err.print(f"[red]✗ no plan fits[/]: {escape(exc.message)}")
        raise typer.Exit(1) from None
    if result is None:
        out.print(
            "The model's shape is not known offline: in the cluster the operator plans it from "
            "the config.json its staging Job reads (give it here with --model-config FILE to "
            "plan now)."
        )
        return
    out.print(escape(format_table(result)))


def _with_local_processes(spec: FineTuneJobSpec, nproc: int | None) -> FineTuneJobSpec:
    """The spec as it runs on this machine: one node, ``nproc`` processes if given."""
    if nproc is None:
        return spec
    resources = spec.resources.model_copy(update={"num_nodes": 1, "gpus_per_node": nproc})
    return spec.model_copy(update={"resources": resources})


@app.command()
def run(
    file: Annotated[str, typer.Argument(help="A FineTuneJob YAML file.")],
    nproc: Annotated[
        int | None,
        typer.Option(help="Training processes on this machine. Default: one per GPU, or 1 on CPU."),
    ] = None,
    runs_dir: Annotated[
        Path, typer.Option(help="Where the run folder (config, default output) goes.")
    ] = Path("finetune-runs"),
    metrics_port: Annotated[
        int, typer.Option(help="Port of the trainer's /metrics (0: any free port).")
    ] = 9090,
) -> None:
    """Fine-tune on this machine from a FineTuneJob, as its pods would in the cluster.

    Launches torchrun over the local devices; the model ends in the job's output.storage (or
    RUNS_DIR/NAME/model) in Hugging Face format.
    """
    job = load_job(file)
    spec = _with_local_processes(job.spec, nproc)
    if spec.resources.gpu_type is None:
        err.print(
            "[red]error[/]: spec.resources.gpuType is left out (in a cluster the operator infers "
            "it from the nodes); a local run needs it: set gpuType: CPU, or this machine's GPU type"
        )
        raise typer.Exit(2)
    try:
        planned = plan_job(spec)
    except PlanInfeasible as exc:
        err.print(f"[red]✗ no plan fits[/]: {escape(exc.message)}")
        raise typer.Exit(1) from None
    run_dir = (runs_dir / job.name).absolute()
    config = to_trainer_config(
        spec,
        name=job.name,
        default_output_dir=str(run_dir / "model"),
        plan=plan_config(planned) if planned else None,
        metrics_port=metrics_port,
    )
    try:
        from finetune_trainer.launch import run_local  # noqa: PLC0415 - needs the trainer extra
    except ImportError as exc:
        _no_trainer(exc)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    config_path.write_text(config.to_json(), encoding="utf-8")
    summary = planned.summary if planned else "planned by the trainer"
    out.print(f"[bold]{escape(job.name)}[/]: plan {escape(summary)}")
    paths = {"config": config_path, "model": Path(config.output_dir)}
    if config.checkpoint.dir:
        paths["checkpoints"] = Path(config.checkpoint.dir)
    for what, path in paths.items():
        out.print(f"  {what:<12}{escape(str(path.absolute()))}")
    raise typer.Exit(run_local(config, nproc))


def _staged(what: str, source: Any) -> str:
    """One summary line of a staged source (a ``finetune_trainer.staging.SourceReport``)."""
    if source.kind != "hf":
        return f"  {what:<8}{source.kind} {source.source}: nothing to download"
    how = f"fetched {source.fetched_bytes:,} bytes" if source.fetched_bytes else "cached, 0 fetched"
    return (
        f"  {what:<8}{source.source} @ {source.commit}: {source.files} files, "
        f"{source.bytes:,} bytes ({how}, {source.seconds:.1f} s)"
    )


@app.command()
def stage(
    file: Annotated[str, typer.Argument(help="A FineTuneJob YAML file.")],
    cache: Annotated[
        Path | None,
        typer.Option(
            help="The cache folder (Hugging Face cache layout). Default: the Hugging Face cache "
            "(HF_HUB_CACHE, or HF_HOME/hub), where `finetune run` then finds the files."
        ),
    ] = None,
    allow_pickle_weights: Annotated[
        bool, typer.Option(help="Accept pickle weights (.bin) when the model has no safetensors.")
    ] = False,
    allow_remote_code: Annotated[
        bool, typer.Option(help="Accept a model whose config.json names custom code (auto_map).")
    ] = False,
) -> None:
    """Download a job's model and dataset once, pinned to commits, and check the model.

    Resolves hf:// revisions to commits, fetches only what the trainer reads (safetensors
    weights, config, tokenizer; the dataset's data files) into the cache, where a second staging
    of the same commit fetches nothing, and reads config.json and the tokenizer's vocabulary.
    Exits 1 when the job's model or data cannot be used (saying why), 2 when the download failed.
    """
    job = load_job(file)
    spec = job.spec
    if spec.resources.gpu_type is None:  # staging reads no GPU type; the translation wants one
        resources = spec.resources.model_copy(update={"gpu_type": "CPU"})
        spec = spec.model_copy(update={"resources": resources})
    config = to_trainer_config(spec, name=job.name, default_output_dir=str(Path.cwd()))
    try:
        from finetune_trainer import staging  # noqa: PLC0415 - needs the trainer extra
    except ImportError as exc:
        _no_trainer(exc)
    if cache is None:
        from huggingface_hub import constants  # noqa: PLC0415 - with the trainer extra

        cache = Path(constants.HF_HUB_CACHE)
    options = staging.Options(allow_pickle_weights, allow_remote_code)
    try:
        report = staging.stage(config, cache, options=options, log=lambda s: out.print(escape(s)))
    except staging.StagingError as exc:
        err.print(f"[red]✗ staging failed[/]: {escape(str(exc))}")
        raise typer.Exit(1 if exc.reason == staging.BAD_INPUT else 2) from None
    shape = report.config
    out.print(
        f"[bold]{escape(job.name)}[/]: staged in {escape(str(cache))}: "
        f"{escape(str(shape.get('model_type')))}, vocabulary {report.vocab_size:,}"
    )
    out.print(escape(_staged("model", report.model)))
    out.print(escape(_staged("dataset", report.dataset)))
    for warning in report.warnings:
        out.print(f"[yellow]warning[/]: {escape(warning)}")


@app.command("operator")
def run_operator(
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Watch only this namespace (repeatable)."),
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="Port of the /metrics endpoint.")] = 8080,
    health_port: Annotated[int, typer.Option(help="Port of the /healthz liveness probe.")] = 8081,
    log_format: Annotated[
        str | None,
        typer.Option(
            help="plain, or json (one object a line). Default: FINETUNE_LOG_FORMAT, else plain."
        ),
    ] = None,
) -> None:
    """Run the operator against the cluster in KUBECONFIG (or in-cluster credentials).

    Logs to stderr at INFO: a start-up line, one line per job phase transition, every error."""
    try:
        from finetune_operator import handlers  # noqa: PLC0415 - needs the operator extra
    except ImportError as exc:
        err.print(
            f"[red]error[/]: the operator is not installed here ({escape(str(exc))}); "
            "install it with: pip install 'finetune-operator[operator]'"
        )
        raise typer.Exit(2) from None
    from finetune_operator.oplog import LOG_FORMATS  # noqa: PLC0415

    chosen = next((f for f in LOG_FORMATS if f == log_format), None)
    if log_format is not None and chosen is None:
        err.print(f"[red]error[/]: --log-format {escape(log_format)}: expected plain or json")
        raise typer.Exit(2)
    handlers.run(
        namespaces=namespace or [],
        metrics_port=metrics_port,
        health_port=health_port,
        log_format=chosen,
    )


Namespace = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace (default: the context's).")
]


def _cluster() -> ModuleType:
    """A client for the cluster in KUBECONFIG; exits 2 with the reason when there is none."""
    try:
        from finetune_operator import kube  # noqa: PLC0415 - needs the operator extra
    except ImportError as exc:
        err.print(f"[red]error[/]: {escape(str(exc))}; pip install 'finetune-operator[operator]'")
        raise typer.Exit(2) from None
    try:
        kube.load_config()
    except Exception as exc:
        err.print(f"[red]error[/]: no cluster to talk to: {escape(str(exc))}")
        raise typer.Exit(2) from None
    return kube


def _fetch(name: str, namespace: str | None) -> tuple[Kube, api.FineTuneJob, str]:
    kube = _cluster()
    ns = namespace or kube.current_namespace()
    client = kube.Kube()
    document = client.finetunejob(ns, name)
    if document is None:
        err.print(f"[red]error[/]: FineTuneJob {escape(name)} not found in namespace {ns}")
        raise typer.Exit(1)
    return client, api.parse(document), ns


@app.command()
def get(
    name: Annotated[str | None, typer.Argument(help="A FineTuneJob (all when omitted).")] = None,
    namespace: Namespace = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A")] = False,
) -> None:
    """List FineTuneJobs with phase, plan, progress and loss."""
    from finetune_operator import render  # noqa: PLC0415

    kube = _cluster()
    ns = None if all_namespaces else (namespace or kube.current_namespace())
    documents = kube.Kube().finetunejobs(ns)
    jobs = [api.parse(d) for d in documents if not name or d["metadata"]["name"] == name]
    if name and not jobs:
        err.print(f"[red]error[/]: FineTuneJob {escape(name)} not found")
        raise typer.Exit(1)
    out.print(render.jobs_table(jobs, namespaces=all_namespaces, width=out.width))


@app.command()
def describe(
    name: Annotated[str, typer.Argument(help="A FineTuneJob.")], namespace: Namespace = None
) -> None:
    """Show a FineTuneJob's plan, conditions, failure and events."""
    from finetune_operator import render  # noqa: PLC0415

    client, job, ns = _fetch(name, namespace)
    out.print(render.describe(job, client.events(ns, job.metadata.uid or "")))


@app.command()
def watch(
    name: Annotated[str, typer.Argument(help="A FineTuneJob.")],
    namespace: Namespace = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 2.0,
) -> None:
    """Follow a FineTuneJob with a progress bar until it ends (exit 1 if it fails)."""
    import time  # noqa: PLC0415

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: PLC0415

    from finetune_operator import render  # noqa: PLC0415

    client, job, ns = _fetch(name, namespace)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeRemainingColumn(), console=out) as bar:
        task = bar.add_task(name, total=None, info="")
        phase = None
        shown: int | None = None
        while True:
            status = job.status
            if status and status.phase != phase:
                phase = status.phase
                bar.console.print(f"{escape(name)}: {phase}")
            progress = status.progress if status else None
            info = escape(render.progress_note(job))
            if progress is not None:
                bar.update(task, completed=progress.step, total=progress.total_steps, info=info)
                if not out.is_terminal and progress.step != shown:  # a log: a line per change
                    shown = progress.step
                    bar.console.print(f"{escape(name)}: {info}")
            else:
                bar.update(task, info=info)
            if phase in {"Succeeded", "Failed"}:
                break
            time.sleep(interval)
            document = client.finetunejob(ns, name)
            if document is None:
                err.print(f"[red]error[/]: FineTuneJob {escape(name)} was deleted")
                raise typer.Exit(1)
            job = api.parse(document)
    if phase == "Failed":
        failure = job.status.failure if job.status else None
        if failure is not None:
            err.print(f"[red]{escape(failure.reason)}[/]: {escape(failure.message)}")
        raise typer.Exit(1)


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="A FineTuneJob.")],
    namespace: Namespace = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
) -> None:
    """Print the trainer's log from the master pod."""
    from finetune_operator.kube import LogsUnavailableError  # noqa: PLC0415
    from finetune_operator.status import pod_problem  # noqa: PLC0415

    client, job, ns = _fetch(name, namespace)
    phase = job.status.phase if job.status and job.status.phase else "Pending"
    from finetune_operator import children  # noqa: PLC0415

    kind = children.of(job.status, children.PYTORCHJOB_CHILD)
    master = [p for p in client.pods(kind, ns, job.name) if p.rank_zero][:1]
    pod = master[0].name if master else f"{job.name}-master-0"
    if not master:
        when = "" if phase in ("Succeeded", "Failed") else " yet"
        err.print(
            f"[red]error[/]: FineTuneJob {escape(name)} has no trainer pod{when} (phase "
            f"{phase}); see what happened with: finetune describe {escape(name)} -n {ns}"
        )
        raise typer.Exit(1)
    if master[0].phase == "Pending":
        problem = pod_problem(master)
        why = f": {problem.message}" if problem else ""
        err.print(
            f"[red]error[/]: the trainer pod {pod} has not started yet{escape(why)}; follow it "
            f"with: finetune watch {escape(name)} -n {ns}"
        )
        raise typer.Exit(1)
    try:
        stream = client.logs(ns, pod, kind.container, follow=follow, tail=tail)
    except LogsUnavailableError as exc:
        err.print(
            f"[red]error[/]: cannot read the log of pod {pod} (FineTuneJob {escape(name)}, "
            f"phase {phase}): {escape(exc.reason)}"
        )
        raise typer.Exit(1) from None
    for chunk in stream.stream() if follow else [stream.data]:
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()


@app.command("crd")
def print_crd() -> None:
    """Print the FineTuneJob CustomResourceDefinition (pipe it to kubectl apply -f -)."""
    sys.stdout.write(crd.crd_yaml())


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"finetune {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
