"""Open-Sora Studio entry point.

    python app.py [--preset shapes-default] [--share] [--host 0.0.0.0] [--port 7860] [--device cuda:0,cuda:1]
                  [--offload] [--compile] [--output-dir outputs] [--weights-dir DIR] [--root-path /studio] [--mcp]
    gradio app.py -- --share          (reload mode: gradio's CLI passes arguments after `--` to this script)

On Hugging Face Spaces the same file runs as is; `spaces.GPU` wraps the generation handlers when the `spaces`
package is installed. The default preset is embedded in assets/, so the studio starts without any download or GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

import gradio as gr

from studio import STUDIO_CSS, EnginePool, StudioSettings, build_demo, deployment_is_public, studio_theme
from studio.settings import load_browser_secret

log = logging.getLogger("app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Studio flags; unknown arguments are ignored (gradio's reload mode and Spaces add their own)."""
    parser = argparse.ArgumentParser(description="Open-Sora Studio: text/image/loop/extend video generation.")
    parser.add_argument("--preset", default=os.environ.get("STUDIO_PRESET", "shapes-default"),
                        help="model preset: shapes-default (embedded), opensora-v2-256px, opensora-v2-768px")
    parser.add_argument("--share", action="store_true", default=None, help="create a public gradio.live link")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or GRADIO_SERVER_PORT)")
    parser.add_argument("--device", default="auto",
                        help="'auto' (every CUDA GPU, else CPU), 'cpu', 'cuda', or a list like cuda:0,cuda:1")
    parser.add_argument("--offload", action="store_true", help="keep models on the CPU and move each to the GPU "
                                                               "only for its stage (less GPU memory, slower)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the MMDiT: faster sampling on a GPU "
                                                               "(1.37x for the 11B on an H200); the first run at "
                                                               "each size compiles first")
    parser.add_argument("--output-dir", default=os.environ.get("STUDIO_OUTPUT_DIR", "outputs"),
                        help="where videos and their JSON recipes are saved (one pair per job)")
    parser.add_argument("--weights-dir", default=None, help="local folder with the official Open-Sora 2.0 weights")
    parser.add_argument("--queue-size", type=int, default=16, help="jobs that may wait in the queue")
    parser.add_argument("--root-path", default=None,
                        help="URL prefix when served behind a reverse proxy, e.g. /studio (or GRADIO_ROOT_PATH)")
    parser.add_argument("--no-metadata", action="store_true",
                        help="leave the recipe out of each video's comment tag (the JSON beside it is still written)")
    parser.add_argument("--public", action="store_true",
                        help="treat the studio as reachable by others (automatic for Spaces, --share, --root-path "
                             "and non-loopback hosts): per-session History, no Unload, visitor LLM URLs checked")
    parser.add_argument("--mcp", action="store_true", default=None,
                        help="also serve the named endpoints (/t2v, /i2v, /loop, /extend, /stop, "
                             "/stop_after_segment) as MCP tools (needs: pip install 'gradio[mcp]')")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        log.info("ignoring arguments not meant for the studio: %s", unknown)
    if args.mcp and importlib.util.find_spec("mcp") is None:
        parser.error("--mcp needs the MCP extra of gradio: pip install 'gradio[mcp]'")
    return args


def create_pool(args: argparse.Namespace, settings: StudioSettings) -> EnginePool:
    """Build and load one engine per device (the heavy part: run once, not on every reload)."""
    from pipelines.components import pick_devices
    from pipelines.engine import Engine
    from pipelines.presets import get_preset

    preset = get_preset(args.preset, weights_dir=args.weights_dir)
    engines = [Engine(preset, device=device, offload=args.offload, compile=args.compile,
                      output_dir=settings.output_dir, llm=settings.llm, embed_recipe=not args.no_metadata,
                      partial_videos=True, keep_references=not settings.public)  # (visitors' uploads: not kept)
               for device in pick_devices(args.device)]
    for engine in engines:
        log.info("loading %s on %s", preset.name, engine.device)
        engine.load()
    return EnginePool(engines)


def gpu_decorator():
    """spaces.GPU on Hugging Face ZeroGPU (the studio gives it a duration callable per tab, studio.gpu_time);
    None elsewhere."""
    try:
        import spaces
    except ImportError:
        return None
    return spaces.GPU


def create_settings(args: argparse.Namespace) -> StudioSettings:
    output_dir = Path(args.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    return StudioSettings(output_dir=output_dir, queue_size=args.queue_size, gpu_decorator=gpu_decorator(),
                          public=deployment_is_public(args.host, args.share, args.root_path, args.public),
                          browser_secret=load_browser_secret(output_dir))


def launch(demo: gr.Blocks, args: argparse.Namespace, settings: StudioSettings, **kwargs):
    """Launch with Gradio 6's launch-time theme/css; only the output and asset folders are served."""
    return demo.launch(server_name=args.host, server_port=args.port, share=args.share, root_path=args.root_path,
                       mcp_server=args.mcp, allowed_paths=settings.served_paths(), theme=studio_theme(),
                       css=STUDIO_CSS, **kwargs)


if gr.NO_RELOAD:
    # Runs once; gradio's reload mode re-executes the rest of this file on each edit and keeps these globals.
    logging.basicConfig(level=os.environ.get("STUDIO_LOG_LEVEL", "INFO"))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request is noise
    ARGS = parse_args(sys.argv[1:])
    SETTINGS = create_settings(ARGS)
    try:
        POOL = create_pool(ARGS, SETTINGS)
    except (ValueError, OSError) as exc:
        sys.exit(f"cannot start the studio: {exc}")

demo = build_demo(POOL, SETTINGS)

if __name__ == "__main__":
    launch(demo, ARGS, SETTINGS)
