"""Start PEFT Studio: `python launch.py [--host 127.0.0.1] [--port 7860] [--auth-file PATH] [--insecure]
[--allow-path DIR] [--allow-remote-code] [--allow-hub]`.

Safe by default: it binds to 127.0.0.1 and answers only requests addressed to that address (DNS rebinding is
refused); a non-loopback address needs a login (--auth-file PATH or STUDIO_AUTH=USER:PASS) or an explicit
--insecure. Never a share link, no analytics. The job scheduler runs in this process and re-attaches jobs that were
running when the studio last stopped; jobs keep running if the studio stops.
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

# Before gradio is imported anywhere: no usage analytics leave the machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from app.http_guard import is_loopback  # noqa: E402  (stdlib only: no gradio, no torch)

AUTH_ON_COMMAND_LINE = (
    "--auth is refused: a password on the command line is visible to every user of this machine (ps, /proc) and "
    "stays in your shell history. Put one line `user:password` in a file only you can read (chmod 600) and pass "
    "--auth-file PATH, or set STUDIO_AUTH=user:password in the studio's environment.")


def parse_auth(value: str, source: str) -> tuple[str, str]:
    user, sep, password = value.strip("\r\n").partition(":")
    if not sep or not user.strip() or not password:
        raise SystemExit(f"error: {source} must be user:password with a non-empty user and password")
    return user.strip(), password


def read_auth_file(path: str) -> tuple[str, str]:
    """The login from a file of one `user:password` line that no other user can read or change."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --auth-file {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SystemExit(f"error: --auth-file {path}: other users can read or change it (mode {stat.filemode(mode)}); "
                         f"run `chmod 600 {path}`")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise SystemExit(f"error: --auth-file {path}: expected one line `user:password`, found {len(lines)}")
    return parse_auth(lines[0], f"--auth-file {path}")


def load_auth(args: argparse.Namespace) -> tuple[str, str] | None:
    """--auth-file, else STUDIO_AUTH (removed from the environment, so that jobs started from here do not inherit
    it); --auth USER:PASS is refused."""
    if args.auth is not None:
        raise SystemExit(f"error: {AUTH_ON_COMMAND_LINE}")
    env = os.environ.pop("STUDIO_AUTH", None)
    if args.auth_file:
        return read_auth_file(args.auth_file)
    return parse_auth(env, "STUDIO_AUTH") if env else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PEFT Studio: fine-tune, watch, evaluate, chat and download in a browser.",
                                allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth-file", default=None, metavar="PATH",
                   help="require a login: PATH holds one line user:password and is readable by you only (chmod 600). "
                        "Or set STUDIO_AUTH=user:password in the environment")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help=argparse.SUPPRESS)
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to NAME (a DNS name of this machine, or the public name of a "
                        "reverse proxy in front of it); repeatable. Other names are refused")
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


def check_args(args: argparse.Namespace, auth) -> str | None:
    """What is wrong with the arguments, or None."""
    if not is_loopback(args.host) and auth is None and not args.insecure:
        return (f"refusing to serve on {args.host} without a login: anyone who can reach this address could train on "
                "your machine and read your adapters and data.\n"
                "  add --auth-file PATH (or set STUDIO_AUTH=user:password), or pass --insecure if the network is "
                "yours alone.")
    if not 1 <= args.port <= 65535:
        return f"--port {args.port}: must be between 1 and 65535"
    if args.max_upload_mb <= 0:
        return f"--max-upload-mb {args.max_upload_mb}: must be positive"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = load_auth(args)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    problem = check_args(args, auth)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    serve(args, auth)
    return 0


def serve(args: argparse.Namespace, auth) -> None:
    apply_policy(args)
    import logging

    # The engine's progress lines (model loads, adapter swaps, evaluations) and refused requests in the studio's log.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("finetune", "studio"):
        logging.getLogger(name).setLevel(logging.INFO)

    import gradio as gr

    from app.http_guard import HostPolicy, guard_lifespan, is_guarded
    from app.main import CSS, build_app
    from finetune import jobs

    if not args.no_scheduler:
        store = jobs.start_scheduler()
        print(f"job store {store.db_path} (up to {store.max_concurrent} job(s) at once)", flush=True)
    from finetune.export import exports_dir

    exports = exports_dir()  # zips of adapters and the merged/GGUF exports: served as downloads
    demo = build_app()
    # Model work (playground, evaluation, /generate, /evaluate) is limited per event to 1 in the "model" group; the
    # rest (polling, forms, the job API) is cheap and runs several at once.
    demo.queue(default_concurrency_limit=8, max_size=256)
    if args.insecure and auth is None and not is_loopback(args.host):
        print(f"WARNING: serving on {args.host} without a login (--insecure)", file=sys.stderr)
    policy = HostPolicy(args.host, args.allowed_host)
    demo.launch(server_name=args.host, server_port=args.port, share=False, auth=auth,
                auth_message="PEFT Studio: log in with the user and password the studio was started with.",
                max_file_size=f"{args.max_upload_mb}mb", allowed_paths=[str(exports)], ssr_mode=False,
                theme=gr.themes.Soft(primary_hue="blue"), css=CSS, footer_links=["api"], show_error=False,
                inbrowser=False, quiet=False, pwa=False, mcp_server=False, enable_monitoring=False,
                app_kwargs={"lifespan": guard_lifespan(policy)}, prevent_thread_lock=True)
    if not is_guarded(demo.app):  # never serve without the host check
        demo.close()
        raise SystemExit("error: the host guard could not be installed; refusing to serve")
    print(f"answering requests addressed to: {', '.join(sorted(policy.names))}"
          f"{' and any IP address' if policy.any_ip else ''}", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    sys.exit(main())
