"""Start PEFT Studio: `python launch.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--insecure]
[--allow-path DIR] [--allow-remote-code] [--allow-hub]`.

Safe by default: it binds to 127.0.0.1; a non-loopback address needs a login (--auth or STUDIO_AUTH=USER:PASS) or
an explicit --insecure. Never a share link, no analytics. The job scheduler runs in this process and re-attaches
jobs that were running when the studio last stopped; jobs keep running if the studio stops.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

# Before gradio is imported anywhere: no usage analytics leave the machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:  # a host name: loopback only if every address it resolves to is
            addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth / STUDIO_AUTH must be USER:PASS with a non-empty user and password")
    return user, password


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PEFT Studio: fine-tune, watch, evaluate, chat and download in a browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="require a login (default: the STUDIO_AUTH environment variable, if set)")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback address without a login (anyone who can reach it can use it)")
    p.add_argument("--max-upload-mb", type=int, default=int(os.environ.get("STUDIO_MAX_UPLOAD_MB", "512")),
                   help="largest file a browser may upload (default 512 MB)")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="let jobs set model.trust_remote_code (runs Python code shipped with a model; default: refused)")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder whose data and models clients may name, besides the studio's uploads and adapter "
                        "store (repeatable)")
    p.add_argument("--allow-hub", action="store_true",
                   help="let clients name hub ids that are not in the local cache (downloads; default: offline)")
    p.add_argument("--no-scheduler", action="store_true",
                   help="do not run queued jobs from this process (another studio or `python -m finetune jobs "
                        "run-scheduler` does)")
    return p.parse_args(argv)


def apply_policy(args: argparse.Namespace) -> None:
    """The operator's choices as environment variables (finetune/policy.py), inherited by every training process.
    Before gradio or huggingface_hub is imported: they read HF_HUB_OFFLINE once, at import."""
    os.environ["STUDIO_CONFINED"] = "1"
    if args.allow_remote_code:
        os.environ["STUDIO_ALLOW_REMOTE_CODE"] = "1"
    roots = [os.path.realpath(os.path.expanduser(d)) for d in args.allow_path]
    for root in roots:
        if not os.path.isdir(root):
            raise SystemExit(f"error: --allow-path {root}: not a folder")
    extra = os.environ.get("STUDIO_ALLOWED_PATHS", "")
    os.environ["STUDIO_ALLOWED_PATHS"] = os.pathsep.join([*roots, *([extra] if extra else [])])
    if args.allow_hub:
        os.environ["STUDIO_ALLOW_HUB"] = "1"
    elif os.environ.get("STUDIO_ALLOW_HUB", "").strip().lower() not in ("1", "true", "yes", "on"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auth = parse_auth(args.auth or os.environ.get("STUDIO_AUTH"))
    if not is_loopback(args.host) and auth is None and not args.insecure:
        print(f"refusing to serve on {args.host} without a login: anyone who can reach this address could train on "
              "your machine and read your adapters and data.\n"
              "  add --auth USER:PASS (or set STUDIO_AUTH=USER:PASS), or pass --insecure if the network is yours alone.",
              file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print(f"--port {args.port}: must be between 1 and 65535", file=sys.stderr)
        return 2
    if args.max_upload_mb <= 0:
        print(f"--max-upload-mb {args.max_upload_mb}: must be positive", file=sys.stderr)
        return 2

    apply_policy(args)
    import logging

    # The engine's progress lines (model loads, adapter swaps, evaluations) in the studio's log; the rest quiet.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("finetune", "studio"):
        logging.getLogger(name).setLevel(logging.INFO)

    import gradio as gr

    from app.main import CSS, build_app
    from finetune import jobs
    from finetune.paths import studio_home

    if not args.no_scheduler:
        store = jobs.start_scheduler()
        print(f"job store {store.db_path} (up to {store.max_concurrent} job(s) at once)", flush=True)
    exports = studio_home() / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    demo = build_app()
    # Model work (playground, evaluation, /generate, /evaluate) is limited per event to 1 in the "model" group; the
    # rest (polling, forms, the job API) is cheap and runs several at once.
    demo.queue(default_concurrency_limit=8, max_size=256)
    if args.insecure and auth is None and not is_loopback(args.host):
        print(f"WARNING: serving on {args.host} without a login (--insecure)", file=sys.stderr)
    demo.launch(server_name=args.host, server_port=args.port, share=False, auth=auth,
                auth_message="PEFT Studio: log in with the user and password the studio was started with.",
                max_file_size=f"{args.max_upload_mb}mb", allowed_paths=[str(exports)], ssr_mode=False,
                theme=gr.themes.Soft(primary_hue="blue"), css=CSS, footer_links=["api"], show_error=False,
                inbrowser=False, quiet=False, pwa=False, mcp_server=False, enable_monitoring=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
