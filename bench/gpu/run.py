"""GPU truth: measure our trainer and check the planner on a real GPU, in one command.

On a CUDA device (in under 8 minutes): for a ~1B Llama-architecture model (Llama-3.2-1B's shape,
full fine-tune) and a ~7B one (Mistral-7B-v0.3's shape, LoRA), random-initialised (no network),
on the shipped tokenizer and data, runs our trainer under the planner's single-GPU plan and its
two runners-up, ``transformers.Trainer`` (defaults plus bf16) and the seed-style loop, each for a
fixed number of steps after warm-up; records real tokens/s, MFU (the planner's FLOP count), CUDA
peak memory (allocated, reserved) beside the planner's predictions; writes
bench/results/gpu-<device>.json and prints a table and the issue's targets.

``--smoke`` runs the same code paths on the planner's builtin tiny models on CPU in about a
minute and writes to a temporary file (or ``--out``). See bench/gpu/README.md.

    bench/gpu/run [--smoke] [--out PATH] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: module -> what to install when it is missing
NEEDED = {
    "torch": "torch (a CUDA build for the GPU run)",
    "transformers": "transformers",
    "peft": "peft",
    "datasets": "datasets",
    "pydantic": "pydantic",
    "mistral_common": "mistral-common (the offline tokenizer)",
}


def missing() -> list[str]:
    """What this bench needs that is not installed (the project itself is found from the
    checkout when it is not installed)."""
    if importlib.util.find_spec("finetune_trainer") is None:
        sys.path.insert(0, str(ROOT / "trainer-image"))
    return [what for mod, what in NEEDED.items() if importlib.util.find_spec(mod) is None]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU (CI)")
    parser.add_argument("--out", type=Path, help="where to write the JSON")
    parser.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds after which the remaining runs are skipped (recorded as skipped)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads in --smoke")
    parser.add_argument(
        "--cases", help="comma-separated case keys to run (default: all of the mode's)"
    )
    args = parser.parse_args()
    # No network by design: never wait on the Hugging Face Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lacking = missing()
    if lacking:
        print(
            "bench/gpu/run: missing Python packages: "
            + ", ".join(lacking)
            + ". Install the trainer's dependencies (pip install -e '.[trainer]': torch with "
            "CUDA, transformers, peft, datasets, mistral-common) and run again; see "
            "bench/gpu/README.md.",
            file=sys.stderr,
        )
        return 2

    import suite  # noqa: PLC0415 - imports torch and the trainer
    import torch  # noqa: PLC0415 - only after the dependency check

    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        print(
            "bench/gpu/run: no CUDA device (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine, "
            "or pass --smoke for the CPU check.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if args.smoke:
        torch.set_num_threads(args.threads)
    else:
        torch.cuda.set_device(device)
    gpu, guessed = suite.detect_gpu(device)
    cases = suite.smoke_cases() if args.smoke else suite.gpu_cases()
    if args.cases:
        wanted = set(args.cases.split(","))
        unknown = wanted - {c.key for c in cases}
        if unknown:
            known = ", ".join(c.key for c in cases)
            print(
                f"bench/gpu/run: unknown cases {sorted(unknown)}; known: {known}", file=sys.stderr
            )
            return 2
        cases = tuple(c for c in cases if c.key in wanted)
    settings = suite.Settings(
        device=device,
        gpu=gpu,
        gpu_guessed=guessed,
        cases=cases,
        smoke=args.smoke,
        hf_batch=4 if args.smoke else None,
        max_docs=160 if args.smoke else None,
        budget_s=args.budget,
    )
    if guessed:
        print(
            f"{torch.cuda.get_device_name(device)} is not in the planner's GPU table: planning "
            f"for {gpu.name}",
            flush=True,
        )
    t0 = time.perf_counter()
    result = suite.run_all(settings)
    if args.out:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.gettempdir()) / "bench-gpu-smoke.json"
    else:
        out = ROOT / "bench" / "results" / f"gpu-{suite.device_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(suite.table(result["cases"]))
    print(json.dumps({"targets": result["targets"]}, indent=2))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
