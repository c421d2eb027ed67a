"""`python -m convert`: quantize an SD3 / SD3.5 diffusers pipeline to an FP8 variant, verify it, publish it.

Every argument, the source and the output location are checked before the first weight is read; problems are
one-line messages (exit 2 for bad input, 1 for failures, 128 + N for signal N), never tracebacks, and nothing is
left behind. `SD35FP8_DEBUG=1` re-raises unexpected errors with their traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sd35fp8.errors import BadInput, Failure, ProjectError, one_line, run_command
from sd35fp8.hub import license_fields, redact, require_token, validate_repo_id
from sd35fp8.loading import format_bytes
from sd35fp8.settings import CONVERSION, LIMITS

from .card import render_model_card
from .checkpoint import parse_size
from .output import (
    REPORT_NAME, Interrupted, WorkFolder, check_apart, check_free_space, check_out, disk_error, failed_step, last_signal,
    remove_leftovers, signals_as_interrupt, step,
)
from .publish import push
from .quantize import ComponentPlan, can_quantize, plan_component, unused_excludes, write_component
from .source import Source, SourceError, resolve
from .verify import ImageSizes, absent_components, estimate_seconds, verify_component, verify_pipeline

DEFAULT_COMPONENTS = ("transformer", "text_encoder_3")
DEVICES = {"auto": None, "cpu": "cpu", "cuda": "cuda"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Quantize an SD3/SD3.5 diffusers pipeline to FP8 (E4M3), write a self-contained `fp8` variant "
        "repo with a model card, verify it by reloading it, and optionally publish it to the Hugging Face Hub. "
        "The Hub token comes from HF_TOKEN or `hf auth login`.",
        epilog="example: python -m convert stabilityai/stable-diffusion-3.5-large --out ./sd35-large-fp8 "
        "--push-to me/sd35-large-fp8",
    )
    parser.add_argument("source", help="Hub repo id (owner/name) or local folder of an SD3-family diffusers pipeline")
    parser.add_argument("--out", type=Path, help="output folder (required unless --dry-run)")
    parser.add_argument("--revision", help="Hub branch, tag or commit of the source")
    parser.add_argument("--components",
                        help=f"comma-separated components to quantize (default: {','.join(DEFAULT_COMPONENTS)}, "
                        "those the pipeline has); the rest are copied")
    parser.add_argument("--exclude", action="append", default=[], metavar="LAYER",
                        help="keep linear layers with this name 16-bit, e.g. proj_out (repeatable)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file written (default: %(default)s)")
    parser.add_argument("--verify-images", type=int, default=0, metavar="N",
                        help="also generate N images in 16-bit and FP8 and record SSIM/PSNR (default: 0)")
    parser.add_argument("--verify-size", type=int,
                        help=f"image size for --verify-images (default: the size the model takes nearest "
                        f"{CONVERSION.verify_size})")
    parser.add_argument("--verify-steps", type=int, default=CONVERSION.verify_steps,
                        help="steps for --verify-images (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where verification runs (default: %(default)s)")
    parser.add_argument("--base-id", help="Hub id of the base model for the card (default: SOURCE when it is a Hub id)")
    parser.add_argument("--push-to", metavar="REPO", help="publish the verified folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--create-pr", action="store_true", help="upload as a pull request instead of a commit")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output of this tool at --out")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (components, sizes) and write nothing")
    return parser


class ConversionError(BadInput):
    """The command line asks for something that cannot be done."""


def _names(text: str | None) -> list[str]:
    return list(dict.fromkeys(name.strip() for name in (text or "").split(",") if name.strip()))


def _check_arguments(args: argparse.Namespace) -> torch.device:
    """Checks that need nothing but the command line; returns the verification device."""
    if args.out is None and not args.dry_run:
        raise ConversionError("--out is required (or use --dry-run to see the plan).")
    if not 0 <= args.verify_images <= CONVERSION.max_verify_images:
        raise ConversionError(f"--verify-images {args.verify_images}: use 0 to {CONVERSION.max_verify_images}.")
    low, high = LIMITS.steps
    if not low <= args.verify_steps <= high:
        raise ConversionError(f"--verify-steps {args.verify_steps}: use {low} to {high}.")
    if (args.private or args.create_pr) and not args.push_to:
        raise ConversionError("--private and --create-pr apply to --push-to: add --push-to OWNER/NAME or drop them.")
    if args.base_id:
        validate_repo_id(args.base_id, "--base-id")
    if args.push_to:
        validate_repo_id(args.push_to, "--push-to")
        require_token()  # before any work, so a missing token costs nothing
    if args.components is not None and not _names(args.components):
        raise ConversionError(f"--components {args.components!r} names nothing to quantize: use e.g. "
                              f"{','.join(DEFAULT_COMPONENTS)}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    return torch.device(DEVICES[args.device] or ("cuda" if torch.cuda.is_available() else "cpu"))


def _plans(source: Source, components: list[str], exclude: list[str]) -> list[ComponentPlan]:
    unknown = [name for name in components if name not in source.components]
    if unknown:
        models = [name for name, c in source.components.items() if c.is_model]
        raise ConversionError(f"--components names {', '.join(unknown)}, not in this pipeline "
                              f"(it has {', '.join(models)}).")
    refused = [name for name in components if not can_quantize(source.components[name])]
    if refused:
        raise ConversionError(f"--components {', '.join(refused)}: this tool stores only the SD3 transformer and T5 "
                              "(text_encoder_3) as FP8; CLIP and the VAE stay 16-bit. Nothing to quantize there.")
    if not components:
        raise ConversionError("nothing to quantize: this pipeline has neither the SD3 transformer nor T5 to store as FP8.")
    plans = [plan_component(c, c.name in components, exclude) for c in source.components.values()]
    empty = [p.component.name for p in plans if p.component.name in components and not p.quantized_layers]
    if empty:
        raise ConversionError(f"{', '.join(empty)}: no linear layer would be stored as FP8 "
                              "(check --components/--exclude).")
    unused = unused_excludes(plans, exclude)
    if unused:
        raise ConversionError(f"--exclude {', '.join(unused)}: no linear layer of {', '.join(components)} goes by that "
                              "name, so it would keep nothing 16-bit (check the spelling, e.g. proj_out).")
    return plans


def _licenses(source: Source) -> dict:
    """The license fields of the source's model card, carried over to the variant's card."""
    try:
        return license_fields(source.path)
    except Exception as error:  # noqa: BLE001 - a YAML parser error (yaml is no direct dependency), or a bad value
        raise SourceError(f"{source.path / 'README.md'}: its metadata block (between the --- lines) cannot be read "
                          f"({type(error).__name__}: {one_line(error)[:120]}): fix or remove it.") from None


def _check_shards(plans: list[ComponentPlan], max_shard: int, text: str) -> None:
    for plan in plans:
        files = math.ceil(plan.bytes_after / max_shard) if plan.quantize else 0
        if files > CONVERSION.max_shards:
            least = format_bytes(math.ceil(plan.bytes_after / CONVERSION.max_shards))
            raise ConversionError(f"--max-shard-size {text} would split {plan.component.name} into about {files} files "
                                  f"(at most {CONVERSION.max_shards}): use at least {least}.")


def _print_plan(source: Source, plans: list[ComponentPlan]) -> None:
    print(f"{source.spec}: {source.pipeline_class}")
    print(f"  {'component':<16}{'class':<30}{'action':<22}{'before':>12}{'after':>12}")
    for plan in plans:
        if not plan.component.is_model:
            continue
        action = f"FP8 ({len(plan.quantized_layers)} layers)" if plan.quantize else "copy 16-bit"
        after = plan.bytes_after if plan.quantize else plan.bytes_before
        print(f"  {plan.component.name:<16}{plan.component.class_name:<30}{action:<22}"
              f"{format_bytes(plan.bytes_before):>12}{format_bytes(after):>12}")
    before = sum(p.bytes_before for p in plans)
    after = sum(p.bytes_after if p.quantize else p.bytes_before for p in plans)
    print(f"  total {format_bytes(before)} -> {format_bytes(after)} (estimate)")


class _Run:
    """Where a run stands, for the message an interruption gets."""

    def __init__(self):
        self.out: Path | None = None
        self.written = False

    def interrupted(self, signum: int) -> Interrupted:
        name = signal.Signals(signum).name
        if self.written:
            return Interrupted(f"interrupted ({name}) while publishing: {self.out} is complete and verified; run again "
                               "with --overwrite --push-to to publish it.", signum)
        return Interrupted(f"interrupted ({name}): nothing was written (any unfinished output was removed).", signum)


def convert(args: argparse.Namespace) -> int:
    """Run the conversion described by parsed command-line `args`; project errors are raised, never printed."""
    run = _Run()
    try:
        return _convert(args, run)
    except KeyboardInterrupt:
        raise run.interrupted(last_signal()) from None
    except ProjectError:
        raise
    except OSError as error:
        raise disk_error(error, failed_step(error)) from None
    except Exception as error:
        if os.environ.get("SD35FP8_DEBUG"):
            raise
        raise Failure(f"unexpected {type(error).__name__} while {failed_step(error)}: {one_line(error)[:300]} "
                      "(run again with SD35FP8_DEBUG=1 for the traceback, and please report it).") from None


def _convert(args: argparse.Namespace, run: _Run) -> int:
    device = _check_arguments(args)
    max_shard = parse_size(args.max_shard_size)
    with step("checking --out"):
        local = Path(args.source).expanduser()
        if args.out is not None and local.is_dir():  # the plainest case first: --out is, holds or is in the source
            check_apart(Path(args.out).expanduser().resolve(), [local.resolve()], args.source)
        out = check_out(args.out, args.overwrite) if args.out is not None else None
    exclude = list(dict.fromkeys(name.strip() for item in args.exclude for name in item.split(",") if name.strip()))
    with step(f"reading the source {args.source}"):
        source = resolve(args.source, args.revision, weights=not args.dry_run)
    if out is not None:
        check_apart(out, source.real_paths, source.spec)
    licenses = _licenses(source)
    if args.push_to and not source.is_hub and not args.base_id:
        raise ConversionError("the source is a local folder: pass --base-id OWNER/NAME so the model card names its "
                              "base model.")
    components = _names(args.components) if args.components is not None else [
        name for name in DEFAULT_COMPONENTS if name in source.components and can_quantize(source.components[name])]
    with step("planning the conversion"):
        plans = _plans(source, components, exclude)
    _check_shards(plans, max_shard, args.max_shard_size)
    sizes = ImageSizes.of(source)
    if args.verify_size is None:
        verify_size = sizes.fit(CONVERSION.verify_size)
    else:
        verify_size = sizes.check(args.verify_size, "--verify-size")
    _print_plan(source, plans)
    if args.dry_run:
        return 0
    needed = sum(p.bytes_after for p in plans) + sum(f.stat().st_size for f in source.top_files)
    check_free_space(out, needed)
    with step(f"removing leftovers of killed runs next to {out}"):
        for line in remove_leftovers(out):
            print(line)
    out = check_out(args.out, args.overwrite)  # again: a leftover put back may be an earlier output
    run.out = out
    with WorkFolder(out) as work:
        _write_and_verify(args, source, plans, exclude, work.path, out, device, sizes, verify_size, max_shard, licenses)
        with step(f"moving the verified output into place at {out}"):
            work.commit()
    run.written = True
    print(f"wrote and verified {out}")
    if args.push_to:
        with step(f"publishing to {args.push_to}"):
            print(f"published: {push(out, args.push_to, private=args.private, create_pr=args.create_pr)}")
    return 0


def _write_and_verify(args, source: Source, plans: list[ComponentPlan], exclude: list[str], work: Path, out: Path,
                      device: torch.device, sizes: ImageSizes, verify_size: int, max_shard: int,
                      licenses: dict) -> None:
    for item in source.top_files:
        with step(f"copying {item}"):
            shutil.copyfile(item, work / item.name)
    total = sum(p.bytes_before for p in plans)
    results = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="quantize + write") as bar:
        for plan in plans:
            with step(f"writing {plan.component.name} (from {plan.component.folder})"):
                results.append(write_component(plan, work / plan.component.name, exclude, max_shard, bar))
    components = {}
    for result in results:
        if result.plan.quantize:
            name = result.plan.component.name
            print(f"verifying {name} ...")
            with step(f"verifying {name}"):
                components[name] = verify_component(work, result, CONVERSION.variant_dtype, device)
    check = sizes.fit(CONVERSION.load_check_size)
    written = sum(r.bytes_after for r in results)
    eta = estimate_seconds(components, written, sizes, check, CONVERSION.load_check_steps)
    print(f"verifying the whole pipeline as its model card loads it: a {check}x{check} image in "
          f"{CONVERSION.load_check_steps} steps (about {eta:.0f} s) ...")
    if args.verify_images:
        eta = estimate_seconds(components, written + total, sizes, verify_size, args.verify_steps,
                               images=2 * args.verify_images, loads=2)
        print(f"  then {args.verify_images} FP8 vs 16-bit image pairs at {verify_size}x{verify_size}, "
              f"{args.verify_steps} steps (about {eta:.0f} s more)")
    with step("verifying the whole pipeline"):
        verification = verify_pipeline(work, source, device, sizes, args.verify_images, verify_size, args.verify_steps)
    verification.components = components
    base_id = args.base_id or (source.spec if source.is_hub else None)
    card = render_model_card(base_id or source.spec, args.push_to or str(out), results, verification,
                             licenses, exclude, absent_components(work))
    (work / "README.md").write_text(card)
    report = {
        "verified": True, "base": base_id or source.spec, "revision": source.revision,
        "components": {r.plan.component.name: {"quantized_layers": len(r.plan.quantized_layers),
                                               "bytes_before": r.plan.bytes_before, "bytes_after": r.bytes_after}
                       for r in results if r.plan.component.is_model},
        "verification": {"components": verification.components, "pipeline": verification.pipeline,
                         "images": verification.images},
    }
    (work / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    for name, check_report in verification.components.items():
        print(f"  {name}: {check_report}")
    if verification.pipeline.get("loaded"):
        print(f"  whole pipeline: loaded in {verification.pipeline['load_seconds']} s, "
              f"generated in {verification.pipeline['generate_seconds']} s")
    if verification.images:
        print(f"  FP8 vs 16-bit: mean SSIM {verification.mean_ssim:.4f}, mean PSNR {verification.mean_psnr:.2f} dB")


def main(argv: list[str] | None = None) -> int:
    """The command: parse `argv`, convert, and return the exit code (errors printed as one line on stderr)."""
    args = build_parser().parse_args(argv)
    with signals_as_interrupt():
        return run_command(lambda: convert(args), redact=redact)
