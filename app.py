"""SD3.5 FP8 demo: generate, compare FP8 with 16-bit, watch the GPU.

    python app.py [--model REPO_ID_OR_DIR] [--base REPO_ID_OR_DIR] [--share] [--offload] [--compile auto|on|off]
                  [--devices auto|cuda:0,cuda:1] [--host H] [--port P]

Every flag has an environment variable (for Hugging Face Spaces): MODEL_ID, BASE_MODEL_ID, SHARE, OFFLOAD, COMPILE,
DEVICES, HOST (or GRADIO_SERVER_NAME), PORT (or GRADIO_SERVER_PORT); further knobs (QUEUE_MAX_SIZE, JOB_TIMEOUT_S) and their
defaults are in sd35fp8/settings.py (`AppSettings`). With nothing given the app runs the built-in tiny-shapes model
(trained on synthetic coloured shapes, shipped in sd35fp8/models/), which needs no download and no GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line values; None where not given (the environment or the default decides)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="FP8 variant made by `python -m convert` (Hub id or folder); default: "
                                         "MODEL_ID or the built-in tiny-shapes model")
    parser.add_argument("--base", help="16-bit reference (Hub id or folder); default: BASE_MODEL_ID or the model "
                                       "card's base_model")
    parser.add_argument("--share", action="store_true", default=None, help="create a public share link")
    parser.add_argument("--offload", action="store_true", default=None,
                        help="model CPU offload: components visit the GPU only while they run (small GPUs)")
    parser.add_argument("--compile", choices=("auto", "on", "off"),
                        help="torch.compile the transformers; auto: where FP8 tensor cores run (fastest measured)")
    parser.add_argument("--devices", help="auto (one replica per GPU) or a list such as cuda:0,cuda:1; default auto")
    parser.add_argument("--host", help="address to listen on (0.0.0.0 for all); default 127.0.0.1")
    parser.add_argument("--port", type=int, help="port to listen on; default 7860")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the models and serve the app; returns an exit code (2: bad input, 1: failure)."""
    from sd35fp8.errors import run_command

    return run_command(lambda: serve(parse_args(argv)))


def serve(args: argparse.Namespace) -> int:
    from sd35fp8.settings import AppSettings
    from space.replicas import Replicas, parse_devices
    from space.runtime import BUILT_IN_NOTICES
    from space.ui import build_demo, launch_kwargs

    settings = AppSettings.from_environment(**vars(args))
    devices = parse_devices(settings.devices)
    print(f"Loading {settings.model} (FP8) on {', '.join(map(str, devices))} ...", flush=True)
    models = Replicas.load(settings.model, settings.base, devices, offload=settings.offload,
                           compile=settings.compile, settings=settings)
    if settings.zerogpu_ahead_of_time:  # ZeroGPU keeps no torch.compile code: compile once, ahead of time
        import spaces

        for replica in models.replicas:
            reports = spaces.GPU(duration=settings.zerogpu_startup_s)(replica.models.compile_ahead_of_time)()
            print(f"Compiled ahead of time for ZeroGPU: {reports}", flush=True)
    print("\n".join(models.summary_lines()), flush=True)
    if models.built_in:
        print(BUILT_IN_NOTICES[models.built_in].replace("**", "") + " Pass --model USER/REPO for a real FP8 model.",
              flush=True)
    demo = build_demo(models, settings)
    demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                **launch_kwargs(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
