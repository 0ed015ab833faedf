"""`dafactory` command line: demo, run, serve, inspect, verify.

Bad input is reported as one line on stderr with exit code 2, before any model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

# Before Prefect or Ray are imported: no telemetry, nothing that needs the network, and a generous
# start-up allowance for Prefect's temporary local server on small machines.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dafactory.tasks.config import DistillConfig, EvaluateConfig, PreferenceConfig, build_config  # noqa: E402
from dafactory.tasks.errors import StorageError, UserError  # noqa: E402

FLOWS = {"preference": PreferenceConfig, "distill": DistillConfig, "evaluate": EvaluateConfig}

DEMO = {
    "dataset": "demo-preference",
    "prompts": {"path": "sample", "category_column": "category"},
    "system_prompt": "You are a helpful assistant. Refuse requests that could cause harm.",
    "n": 4,
    "sampling": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 48, "seed": 0},
    # The generator takes all cores but half of one (its default on a local Ray), which the scorers get.
    "student": {"batch_size": 16},
    "scoring": {"num_cpus": 0.5},
    # The embedded model judges its own samples through P(yes): weak, but a continuous score that
    # ranks; the refusal heuristic is recorded beside it.
    "scorers": [{"name": "yes_no_judge", "model": "smollm2-135m-instruct"}, {"name": "refusal_heuristic"}],
    "shard_size": 4,
    # The sample's 8 harmful prompts are StrongREJECT's own (its `source` column says so), so the demo checks
    # them against DAN only: do not report StrongREJECT ASR for a model trained on the demo's pairs. A build
    # on your own prompts checks both sets (the default).
    "decontamination": {"eval_sets": ["dan"]},
}

DEMO_DISTILL = {
    "dataset": "demo-distill",
    # Our own prompts across the spec's categories, one near duplicate and one StrongREJECT prompt, so
    # that dedup and decontamination have something to show.
    "prompts": {"path": "distill_sample", "category_column": "category"},
    "k": 1,
    # Budget forcing: a reasoning still open after 64 tokens is closed for the teacher, which then answers in at
    # most 48 (the 135M teacher almost never closes </think> by itself).
    "sampling": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 96, "seed": 0, "reasoning_budget": 64,
                 "answer_budget": 48},
    "teacher": {"batch_size": 12},
    # The 135M teacher does not end its answers within the budget either: the demo keeps answers cut at 48
    # tokens (finish_reason "length"; counted as answer_cut_in_train), to show the data for what it is.
    "keep_cut_answers": True,
    "judging": {"num_cpus": 0.5},
    # The heuristic judge reads the answer: a refusal passes for harmful prompts, help for benign ones.
    "judges": [{"name": "refusal_heuristic", "reads": ["answer"]}],
    "shard_size": 6,
}


def _fail(message: str, code: int = 2) -> int:
    from dafactory.tasks.io.redact import redact_text

    print(f"dafactory: error: {redact_text(message)}", file=sys.stderr)
    return code


class _TemporaryServer:
    """Prefect's temporary server for a command run with no API URL set: Prefect's own server app under uvicorn,
    started the way Prefect starts it (prefect.server.api.server.SubprocessASGIServer) but as soon as the input
    is checked, so that it starts while Ray does and Prefect imports, instead of when the flow is called (the
    flow's client then imports the server module, 1.7 s here, and waits about 3 s more). The command's flows
    use it through their settings; after the last one it stops while Ray does. A server the user points at
    (PREFECT_API_URL, in the environment or a Prefect profile) is used as it is."""

    def __init__(self) -> None:
        self.process = self.url = None
        if "prefect" not in sys.modules and not os.environ.get("PREFECT_API_URL"):
            # before Prefect imports (0.6 s here): `ready` stops it if Prefect's settings name a server after all
            self._spawn({})

    def _spawn(self, settings: dict) -> None:
        import atexit
        import socket
        import subprocess

        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **settings}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
             "error", "--lifespan", "on"],
            env=env)
        atexit.register(self.stop)

    def ready(self) -> str | None:
        """The API URL once the server answers. None when Prefect's settings name a server, or (the flow call
        then starts Prefect's own temporary server, and says why it cannot) when this one exits first."""
        import time

        import httpx
        from prefect.logging import get_logger
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            get_current_settings,
        )

        from dafactory.tasks.run.control import TEMPORARY_SERVERS

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            self.stop()
            return None
        if self.process is None:  # Prefect was imported already (in-process callers): its settings go along
            self._spawn(get_current_settings().to_environment_variables(exclude_unset=True))
        if self.url not in TEMPORARY_SERVERS:
            TEMPORARY_SERVERS.add(self.url)
            get_logger().info("Starting temporary server on %s (it stops with this command)",
                              self.url.removesuffix("/api"))
        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        with httpx.Client() as client:
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.stop()
        return None

    def stop_in_background(self) -> threading.Thread | None:
        if self.process is None:
            return None
        stopping = threading.Thread(target=self.stop, name="prefect-server-stop", daemon=True)
        stopping.start()
        return stopping

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        # what the flow logged and emitted reaches the server first (as prefect_test_harness does)
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            worker.drain_all(timeout=10)
        process.terminate()
        try:
            process.wait(timeout=5)
        except Exception:
            process.kill()
            process.wait()


# uvicorn, in a process that gets SIGTERM when this command dies, however it dies (Linux: PR_SET_PDEATHSIG, set in
# the child itself rather than by a preexec_fn, which is unsafe once the command has threads); argv: this
# command's pid, then uvicorn's arguments
_DIE_WITH_PARENT = """
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)  # the command died before this process could ask to follow it
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def _run(config, last: bool = True) -> dict:
    """Check the input (bad input fails here, before Prefect, Ray or any model starts), then run. After the
    command's `last` flow, Prefect's temporary server stops while Ray does."""
    from dafactory.tasks.run.preflight import check_endpoints, preflight

    preflight(config)
    check_endpoints(config)
    if isinstance(config, DistillConfig):
        from dafactory.tasks.run.distill import check_categories, setup

        check_categories(config, setup(config))
    name = next(name for name, cls in FLOWS.items() if isinstance(config, cls))
    global _server
    if _server is None or _server.process is None:
        _server = _TemporaryServer()
    from dafactory.tasks.run.session import ray_started_early

    stopping = None
    try:
        with ray_started_early(config.ray):  # Ray starts while Prefect's temporary server does
            from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

            from dafactory.flows.deploy import flow_of

            url = _server.ready()
            try:
                # no "View at" link: this server serves no UI (as Prefect's temporary server does not)
                with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: ""} if url else {}):
                    return flow_of(name)(config)
            finally:
                if last:
                    stopping = _server.stop_in_background()
    finally:
        if stopping is not None:
            stopping.join()


_server: _TemporaryServer | None = None


def _print_summary(manifest: dict, uri: str) -> None:
    from dafactory.tasks.io.manifest import summary_rows

    print(f"\ndataset: {uri}")
    rows = summary_rows(manifest, cost=False)
    width = max(len(r["what"]) for r in rows)
    for r in rows:
        print(f"  {r['what']:<{width}}  {r['count']:>8}")
    t = manifest["timings_s"]
    print(f"  time: prepare {t['prepare']}s, build {t['build']}s")
    if manifest.get("cost"):
        _print_cost(manifest["cost"])


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _print_cost(cost: dict) -> None:
    """Per stage: the dataset's samples and tokens (resumed shards included), then this run's busy time,
    throughput per busy replica, resource-seconds and estimated cost (README: the manifest's `cost`)."""
    prices = ", ".join(f"{v:g} per {k.removeprefix('per_').replace('_', '-')}" for k, v in cost["prices"].items()
                       if v is not None) or "none set"
    print(f"  cost: build wall {_num(cost['wall_s'])}s, replicas held {_num(cost['held_s'])}s, "
          f"{_num(cost['samples_per_s'], 2)} samples/s; prices: {prices}")
    head = ("stage", "replicas", "samples", "prompt tok", "gen tok", "busy s", "tok/s", "samples/s", "busy",
            "CPU-s", "GPU-s", "cost")
    table = [head]
    for stage, e in cost["stages"].items():
        run = e["this_run"]
        table.append((
            stage, f"{e['replicas']} x {e['num_cpus']:g}C/{e['num_gpus']:g}G", _num(e["samples"]),
            _num(e.get("prompt_tokens")), _num(e.get("generated_tokens")), _num(run["busy_s"]),
            _num(run.get("tokens_per_s"), 2), _num(run["samples_per_s"], 2),
            "-" if run["busy_share"] is None else f"{run['busy_share']:.0%}", _num(run["cpu_s"]), _num(run["gpu_s"]),
            _num(run["cost"], 4),
        ))
    total = cost["total"]
    table.append(("total", "", "", "", "", "", "", "", "", _num(total["cpu_s"]), _num(total["gpu_s"]),
                  _num(total["cost"], 4)))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("    " + "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
    print("    (samples and tokens: the whole dataset; the rest: this run's shards only)")


def _demo_config(cls, demo: dict, output: str, overrides: list[str]):
    data = dict(demo, output=output)
    return build_config(cls, None, [f"{k}={json.dumps(v)}" for k, v in data.items()] + overrides)


def cmd_demo(args) -> int:
    """The main job (a preference set), then a small distilled set, on the embedded default model."""
    configs = [_demo_config(PreferenceConfig, DEMO, args.output, args.set)]
    if not args.skip_distill:
        configs.append(_demo_config(DistillConfig, DEMO_DISTILL, args.output, args.set_distill))
    for config in configs:
        from dafactory.tasks.run.preflight import preflight

        preflight(config)  # every demo's input is checked before the first model loads
    uris = []
    for i, config in enumerate(configs):
        manifest = _run(config, last=i == len(configs) - 1)
        uris.append(f"{config.output.rstrip('/')}/{config.dataset}")
        _print_summary(manifest, uris[-1])
    print("\nlook at them: " + "; ".join(f"dafactory inspect {u}" for u in uris))
    print("check every input row is accounted for: " + "; ".join(f"dafactory verify {u}" for u in uris))
    return 0


def cmd_run(args) -> int:
    config = build_config(FLOWS[args.flow], args.config, args.set)
    manifest = _run(config)
    _print_summary(manifest, f"{config.output.rstrip('/')}/{config.dataset}")
    return 0


def cmd_serve(args) -> int:
    from dafactory.flows.deploy import serve

    serve(args.config)
    return 0


def _short(value, n=100) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def _dataset(path: str):
    import fsspec

    from dafactory.tasks.io.storage import DatasetDir

    uri = path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(root):
        raise UserError(f"no such dataset: {uri}")
    output, _, name = uri.rpartition("/")
    return DatasetDir(output or ".", name)


def _compare(ds, version: int, manifest: dict) -> int:
    """What changed from an earlier version to the current one: rows per table, config, code."""
    old = ds.read_version(version)
    if old is None:
        kept = ", ".join(map(str, ds.versions())) or "none"
        raise UserError(f"{ds.uri}: version {version} is not kept (kept: {kept}; see keep_versions)")
    print(f"{ds.uri}: version {version} ({old['created_at']}) -> version {manifest['version']} "
          f"({manifest['created_at']})")
    for table in dict.fromkeys([*old["tables"], *manifest["tables"]]):
        a, b = old["tables"].get(table, {}).get("rows", 0), manifest["tables"].get(table, {}).get("rows", 0)
        print(f"  {table + ' rows':<24} {a:>8} -> {b:<8} ({b - a:+d})")
    for what, key in (("config hash", "fingerprint"), ("status", "status"), ("code", "code")):
        same = "(same)" if old[key] == manifest[key] else ""
        print(f"  {what:<24} {_short(old[key], 60)} -> {_short(manifest[key], 60)} {same}")
    a, b = old["accounting"]["source_rows"], manifest["accounting"]["source_rows"]
    print(f"  {'source rows':<24} {a:>8} -> {b:<8} ({b - a:+d})")
    return 0


def cmd_inspect(args) -> int:
    ds = _dataset(args.path)
    uri = ds.uri
    manifest = ds.read_manifest()
    if args.version is not None and manifest is not None:
        return _compare(ds, args.version, manifest)
    if manifest is None:
        print(f"{uri}: INCOMPLETE (no version committed: a first run is in progress or failed)")
        from dafactory.tasks.io.schemas import TABLES

        for table in TABLES:
            written = len(ds.parts(table))
            if written:
                print(f"  {table}: {written} parts written so far (no version lists them yet)")
        return 1
    _print_summary(manifest, uri)
    print(f"  version {manifest['version']} of {manifest['created_at']}"
          + (f" (earlier versions kept: {', '.join(map(str, ds.versions()[:-1]))})" if len(ds.versions()) > 1 else ""))
    rebuild = ds.read_rebuild()
    if rebuild is not None:
        s = rebuild["shards"]
        print(f"  a rebuild is INCOMPLETE ({s['built'] + s['resumed']} of {s['total']} shards, {len(s['failed'])} "
              f"failed, stopped: {rebuild['stopped']}): the version above stays the dataset until a re-run finishes it")
    if manifest["status"] != "complete":
        s = manifest["shards"]
        stopped = f" (stopped: {manifest['stopped']})" if manifest.get("stopped") else ""
        print(f"  INCOMPLETE: {s['done']} of {s['total']} shards done, {len(s['failed'])} failed, "
              f"{s['not_built']} not built{stopped}; re-run the same config to finish it")
        if manifest.get("error_rate"):
            print(f"  stopped by max_error_rate: {manifest['error_rate']}")
    cfg = manifest["config"]
    role = "student" if "student" in cfg else "teacher"
    # preference: scorers; distill: judges; evaluate: its judge (and any extra scorers)
    judges = [*([cfg["judge"]] if cfg.get("judge") else []), *(cfg.get("scorers") or []), *(cfg.get("judges") or [])]
    print(f"  {role}: {cfg[role]['model']} ({cfg[role]['backend']}), "
          f"judged by: {', '.join(dict.fromkeys(s['name'] for s in judges)) or 'none'}")
    if "spec" in manifest:
        print(f"  spec: {manifest['spec']['name']} v{manifest['spec']['version']} ({manifest['spec']['sha256'][:12]})")
    print(f"  code: {manifest['code']}")
    for table in [t for t in manifest["tables"] if t not in ("candidates", "quarantine")]:
        rows = ds.read_table(table).slice(0, args.rows).to_pylist()
        print(f"\n{table} (first {len(rows)}):")
        for r in rows:
            print("  " + _short({k: r[k] for k in list(r)[:5]}, 200))
    return 0


def cmd_verify(args) -> int:
    """Recompute the accounting from the files alone; 0 complete and consistent, 3 consistent but
    incomplete, 1 any mismatch."""
    from dafactory.tasks.io.verify import verify

    ds = _dataset(args.path)
    v = verify(ds)
    for problem in v.problems:
        print(f"MISMATCH {problem}")
    for note in v.notes:
        print(f"NOTE {note}")
    c = v.counts
    if c:
        print(f"{ds.uri}: {c['source_rows']} source rows = {c['set_aside_at_input']} set aside at input "
              f"+ {c['planned_prompts']} planned; planned = {c['prompts_with_output']} with output "
              f"+ {c['prompts_quarantined_in_shards']} quarantined in shards + {c['prompts_in_failed_shards']} "
              f"in failed shards + {c['prompts_in_unbuilt_shards']} in shards not built")
    verdict = "MISMATCH" if v.problems else "ok" if v.status == "complete" else "ok but INCOMPLETE"
    print(f"verify: {verdict} ({len(v.problems)} problems, status {v.status})")
    return v.code


def cmd_vacuum(args) -> int:
    """Remove versions and files that no kept version needs (Delta Lake's VACUUM); see retention_hours."""
    from dafactory.tasks.io.commit import vacuum
    from dafactory.tasks.io.schemas import TABLES

    ds = _dataset(args.path)
    manifest = ds.read_manifest()
    if manifest is None:
        raise UserError(f"{ds.uri}: no version committed yet; nothing to vacuum")
    cfg = manifest.get("config", {})
    hours = args.retention_hours if args.retention_hours is not None else cfg.get("retention_hours", 168.0)
    keep = args.keep_versions if args.keep_versions is not None else cfg.get("keep_versions", 1)
    done = vacuum(ds, list(TABLES), keep, hours, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{ds.uri}: {verb} {done['files']} files and {done['versions']} versions (kept versions "
          f"{', '.join(map(str, done['retained_versions']))}; window {hours:g}h, keep_versions {keep})")
    return 0


def cmd_push(args) -> int:
    """Publish the current version to the Hugging Face Hub as one commit (see tasks/io/push.py)."""
    from dafactory.tasks.io.push import push

    ds = _dataset(args.path)
    lines = push(ds, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    for line in lines:
        print(("would " if args.dry_run else "") + line)
    if not args.dry_run:
        print(f"pushed {ds.uri} to https://huggingface.co/datasets/{args.repo_id}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dafactory", description="Data factory for LLM safety alignment.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build a small preference set with the embedded default model")
    d.add_argument("--output", default="./dafactory-output", help="output root (default ./dafactory-output)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the preference demo's config")
    d.add_argument("--set-distill", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the distillation demo's config")
    d.add_argument("--skip-distill", action="store_true", help="build only the preference set")
    d.set_defaults(func=cmd_demo)
    vc = sub.add_parser("vacuum", help="remove versions and parts no kept version needs (after the retention)")
    vc.add_argument("path", help="dataset folder (local path or s3://...)")
    vc.add_argument("--retention-hours", type=float, default=None,
                    help="window in hours (default: the dataset's retention_hours, 168)")
    vc.add_argument("--keep-versions", type=int, default=None,
                    help="earlier versions always kept (default: the dataset's keep_versions)")
    vc.add_argument("--dry-run", action="store_true", help="print what would be removed")
    vc.set_defaults(func=cmd_vacuum)
    r = sub.add_parser("run", help="run a flow from a YAML config")
    r.add_argument("flow", choices=sorted(FLOWS))
    r.add_argument("--config", required=False, help="YAML config file")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    r.set_defaults(func=cmd_run)
    sv = sub.add_parser("serve", help="register the deployments of a deploy config and serve them")
    sv.add_argument("--config", required=True, help="deploy YAML (see configs/deploy.yaml)")
    sv.set_defaults(func=cmd_serve)
    i = sub.add_parser("inspect", help="summarise a dataset folder")
    i.add_argument("path")
    i.add_argument("--rows", type=int, default=3)
    i.add_argument("--version", type=int, default=None,
                   help="compare this earlier version (kept in _versions/) with the current one")
    i.set_defaults(func=cmd_inspect)
    pu = sub.add_parser("push", help="publish the current version (card, manifest, the files the card lists) "
                        "to the Hugging Face Hub as one commit; refuses a folder that does not verify")
    pu.add_argument("path", help="dataset folder (local path or s3://...)")
    pu.add_argument("repo_id", help="Hub dataset repository, e.g. my-org/nightly-pairs")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    pu.add_argument("--dry-run", action="store_true", help="print the exact operations; upload nothing")
    pu.set_defaults(func=cmd_push)
    v = sub.add_parser("verify", help="check that every input row is accounted for, from the files alone "
                       "(exit 0 ok, 1 mismatch, 3 ok but incomplete)")
    v.add_argument("path")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    from dafactory.tasks.io.redact import install_log_filter

    install_log_filter()
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        return _fail(str(exc))
    except StorageError as exc:
        return _fail(f"{exc}; nothing was marked complete, re-run to resume", 1)
    except KeyboardInterrupt:
        return _fail("stopped; the shards written are kept (manifest status incomplete); "
                     "re-run the same command to resume", 130)
    except BaseException as exc:
        from prefect.exceptions import TerminationSignal

        from dafactory.tasks.generate.error_rate import TooManyErrors
        from dafactory.tasks.run.build import ShardsFailed

        if isinstance(exc, (ShardsFailed, TooManyErrors)):
            return _fail(str(exc), 1)
        if isinstance(exc, TerminationSignal):
            return _fail("terminated; the shards written are kept (manifest status incomplete); "
                         "re-run the same command to resume", 143)
        raise


if __name__ == "__main__":
    sys.exit(main())
