"""Screenshot TensorBoard's dashboards for a run the callback wrote (how docs/figures/tensorboard-*.png were made).

Starts TensorBoard on the loopback interface for LOGDIR, waits until its HTTP API lists the
callback's scalars, then has headless Chromium render a dashboard to a PNG, and stops the
server. Needs the ``chromium`` browser (Debian: ``apt-get install chromium``).

    keras-hesstrace demo --out hesstrace-demo
    python examples/tensorboard_screenshot.py hesstrace-demo/tensorboard docs/figures/tensorboard-custom-scalars.png
    python examples/tensorboard_screenshot.py hesstrace-demo/tensorboard docs/figures/tensorboard-scalars.png --dashboard timeseries
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_tags(url, timeout):
    """Poll TensorBoard's scalar tags until some hessian_trace tag is listed."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as r:
                tags = json.load(r)
            if any(t.startswith("hessian_trace") for run in tags.values() for t in run):
                return tags
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"TensorBoard at {url} listed no hessian_trace scalars within {timeout} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="the TensorBoard log directory (the callback's log_dir, or a folder of runs)")
    parser.add_argument("png", help="the screenshot to write")
    parser.add_argument("--dashboard", default="custom_scalars",
                        help="custom_scalars (statistic and threshold on one chart, the default) or timeseries")
    parser.add_argument("--size", default="1400,1100", help="window width,height in pixels. Defaults to 1400,1100")
    parser.add_argument("--budget-ms", type=int, default=25000, help="virtual time Chromium lets the page load")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("needs chromium (Debian: apt-get install chromium)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tags = wait_for_tags(url, 120)
        print(f"TensorBoard on {url}: runs {sorted(tags)}")
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--user-data-dir={profile}", f"--window-size={args.size}",
                 f"--virtual-time-budget={args.budget_ms}", f"--screenshot={os.path.abspath(args.png)}",
                 f"{url}/?darkMode=false#{args.dashboard}"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        print(f"wrote {args.png} ({os.path.getsize(args.png)} bytes)")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
