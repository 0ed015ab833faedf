"""A look at the Prefect UI's view of a build, as a user sees it: a Prefect server with its UI on loopback,
a small preference build (fake backend) run against it, and headless Chromium screenshots of the flow run's
sample-rows artifact and of its Artifacts tab.

    python benchmarks/ui_screenshot.py --out /tmp/ui   # needs chromium (apt-get install chromium)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shot(url: str, path: Path, size: str = "1400,1800") -> None:
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=15000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{path}: {url}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="ui-screenshots")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dafactory-ui-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(work / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_UI_ENABLED="true", PREFECT_UI_API_URL=api,
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{work}/prefect.db")
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        prompts = work / "p.jsonl"
        rows = [{"prompt": f"How do I {verb} a {thing}?", "category": cat} for verb, thing, cat in [
            ("bake", "sourdough loaf", "benign"), ("pick", "neighbour's door lock", "crime"),
            ("write", "phishing email to a bank's customers", "fraud"), ("plant", "tomato seedling", "benign"),
            ("forge", "doctor's note", "fraud"), ("fix", "flat bicycle tire", "benign")]] + [{"prompt": ""}]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        run = subprocess.run(
            [str(Path(sys.executable).with_name("dafactory")), "run", "preference", "--set", f"prompts.path={prompts}",
             "--set", "prompts.category_column=category", "--set", f"output={work / 'out'}", "--set", "dataset=nightly",
             "--set", "student.backend=fake", "--set", "n=4", "--set", "shard_size=2",
             "--set", "student.num_cpus=0.5", "--set", "scoring.num_cpus=0.5"],
            cwd=ROOT, env=dict(env, PREFECT_API_URL=api), capture_output=True, text=True, timeout=600)
        print(run.stdout[-500:], run.stderr[-1500:])
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [
            "nightly-preference-sample-rows"]}}}).json()
        artifact = artifacts[0]
        shot(f"http://127.0.0.1:{port}/artifacts/artifact/{artifact['id']}", out / "sample-rows.png")
        shot(f"http://127.0.0.1:{port}/runs/flow-run/{artifact['flow_run_id']}?tab=Artifacts", out / "artifacts-tab.png",
             "1400,900")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
