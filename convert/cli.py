"""`python -m convert`: quantize an SD3 / SD3.5 diffusers pipeline to an FP8 variant, verify it, publish it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sd35fp8.loading import format_bytes

from .checkpoint import CheckpointError, SafetensorsReader, parse_size, weight_files
from .publish import REPORT_NAME, PublishError, check_repo_id, push, require_token
from .quantize import ComponentPlan, plan_component, write_component
from .card import base_card_metadata, render_card
from .source import Source, SourceError, resolve
from .verify import VerificationError, verify_component, verify_pipeline

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
    parser.add_argument("--verify-size", type=int, default=512, help="image size for --verify-images (default: %(default)s)")
    parser.add_argument("--verify-steps", type=int, default=20, help="steps for --verify-images (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where verification runs (default: %(default)s)")
    parser.add_argument("--base-id", help="Hub id of the base model for the card (default: SOURCE when it is a Hub id)")
    parser.add_argument("--push-to", metavar="REPO", help="publish the verified folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--create-pr", action="store_true", help="upload as a pull request instead of a commit")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (components, sizes) and write nothing")
    return parser


class ConversionError(RuntimeError):
    """The command line asks for something that cannot be done."""


def _check_out(out: Path | None, overwrite: bool, dry_run: bool) -> None:
    if out is None:
        if not dry_run:
            raise ConversionError("--out is required (or use --dry-run to see the plan).")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"{out} already exists and is not empty: choose another --out or pass --overwrite.")


def _plans(source: Source, components: list[str], exclude: list[str]) -> list[ComponentPlan]:
    unknown = [name for name in components if name not in source.components]
    if unknown:
        models = [name for name, c in source.components.items() if c.is_model]
        raise ConversionError(f"--components names {', '.join(unknown)}, not in this pipeline (it has {', '.join(models)}).")
    plans = [plan_component(c, c.name in components, exclude) for c in source.components.values()]
    empty = [p.component.name for p in plans if p.component.name in components and not p.quantized_layers]
    if empty:
        raise ConversionError(f"{', '.join(empty)}: no linear layer would be stored as FP8 (check --components/--exclude).")
    return plans


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


def _source_dtype(source: Source) -> torch.dtype:
    component = source.components["transformer"]
    reader = SafetensorsReader(weight_files(component.folder, component.library))
    return next(reader.dtype(n) for n in reader.keys() if reader.dtype(n) in (torch.bfloat16, torch.float16, torch.float32))


def convert(args: argparse.Namespace) -> int:
    """Run the conversion described by parsed command-line `args`."""
    if args.push_to:
        check_repo_id(args.push_to)
        require_token()  # before any work, so a missing token costs nothing
    _check_out(args.out, args.overwrite, args.dry_run)
    exclude = [name for item in args.exclude for name in item.split(",") if name]
    source = resolve(args.source, args.revision, weights=not args.dry_run)
    if args.push_to and not source.is_hub and not args.base_id:
        raise ConversionError("the source is a local folder: pass --base-id OWNER/NAME so the model card names its base model.")
    if args.components is None:
        components = [name for name in DEFAULT_COMPONENTS if name in source.components]
    else:
        components = [name.strip() for name in args.components.split(",") if name.strip()]
    plans = _plans(source, components, exclude)
    _print_plan(source, plans)
    if args.dry_run:
        return 0
    out = args.out.resolve()
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    device = torch.device(DEVICES[args.device] or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _source_dtype(source)
    try:
        _write_and_verify(args, source, plans, exclude, partial, out, device, dtype)
        _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print(f"wrote and verified {out}")
    if args.push_to:
        print(f"published: {push(out, args.push_to, private=args.private, create_pr=args.create_pr)}")
    return 0


def _write_and_verify(args, source: Source, plans, exclude, partial: Path, out: Path, device, dtype) -> None:
    partial.mkdir(parents=True)
    for item in source.path.iterdir():
        if item.is_file() and item.name != "README.md":
            shutil.copy2(item, partial / item.name)
    total = sum(p.bytes_before for p in plans)
    max_shard = parse_size(args.max_shard_size)
    with tqdm(total=total, unit="B", unit_scale=True, desc="quantize + write") as bar:
        results = [write_component(plan, partial / plan.component.name, exclude, max_shard, bar) for plan in plans]
    components = {}
    for result in results:
        if result.plan.quantize:
            print(f"verifying {result.plan.component.name} ...")
            components[result.plan.component.name] = verify_component(partial, result, dtype, device)
    print("verifying the whole pipeline ...")
    verification = verify_pipeline(partial, str(source.path), device, dtype,
                                   args.verify_images, args.verify_size, args.verify_steps)
    verification.components = components
    base_id = args.base_id or (source.spec if source.is_hub else None)
    card = render_card(base_id or source.spec, args.push_to or str(out), results, verification, base_card_metadata(source.path), exclude)
    (partial / "README.md").write_text(card)
    report = {
        "verified": True, "base": base_id or source.spec, "revision": source.revision,
        "components": {r.plan.component.name: {"quantized_layers": len(r.plan.quantized_layers),
                                               "bytes_before": r.plan.bytes_before, "bytes_after": r.bytes_after}
                       for r in results if r.plan.component.is_model},
        "verification": {"components": verification.components, "pipeline": verification.pipeline,
                         "images": verification.images},
    }
    (partial / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    for name, check in verification.components.items():
        print(f"  {name}: {check}")
    if verification.images:
        print(f"  FP8 vs 16-bit: mean SSIM {verification.mean_ssim:.4f}, mean PSNR {verification.mean_psnr:.2f} dB")


def _move_into_place(partial: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return convert(args)
    except (SourceError, CheckpointError, ConversionError, VerificationError, PublishError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output folder was left behind", file=sys.stderr)
        return 130
