"""SD3.5 FP8 demo: generate, compare FP8 with 16-bit, watch the GPU.

    python app.py [--model REPO_ID_OR_DIR] [--base REPO_ID_OR_DIR] [--share] [--offload] [--compile auto|on|off]
                  [--host H] [--port P]

Every flag has an environment variable (for Hugging Face Spaces): MODEL_ID, BASE_MODEL_ID, SHARE, OFFLOAD, COMPILE,
HOST (or GRADIO_SERVER_NAME), PORT (or GRADIO_SERVER_PORT). With nothing given the app runs the built-in
tiny model (random weights), which needs no download and no GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=env.get("MODEL_ID") or "tiny",
                        help="FP8 variant made by `python -m convert` (Hub id or folder); default: MODEL_ID or the "
                             "built-in tiny model")
    parser.add_argument("--base", default=env.get("BASE_MODEL_ID") or None,
                        help="16-bit reference (Hub id or folder); default: BASE_MODEL_ID or the model card's base_model")
    parser.add_argument("--share", action="store_true", default=_env_flag("SHARE"), help="create a public share link")
    parser.add_argument("--offload", action="store_true", default=_env_flag("OFFLOAD"),
                        help="model CPU offload: components visit the GPU only while they run (small GPUs)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default=env.get("COMPILE") or "auto",
                        help="torch.compile the transformers; auto: where FP8 tensor cores run (fastest measured)")
    parser.add_argument("--host", default=env.get("HOST") or env.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=int(env.get("PORT") or env.get("GRADIO_SERVER_PORT") or 7860))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from sd35fp8.loading import LoadError
    from space.runtime import Models
    from space.ui import build_demo, launch_kwargs

    print(f"Loading {args.model} (FP8) ...", flush=True)
    try:
        models = Models.load(args.model, args.base, offload=args.offload, compile=args.compile)
    except LoadError as error:
        sys.exit(f"error: {error}")
    print("\n".join(models.summary_lines()), flush=True)
    if models.is_tiny:
        print("Running the built-in tiny model (random weights): its images are noise by design. "
              "Pass --model USER/REPO for a real FP8 model.", flush=True)
    demo = build_demo(models)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs())


if __name__ == "__main__":
    main()
