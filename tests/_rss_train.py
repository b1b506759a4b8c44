"""Run by tests/test_streaming.py in a subprocess: train 1 epoch and evaluate on a tiny data
file (which pays every fixed cost: imports, thread pools, first calls), then on a big
memory-mapped one, and print as JSON the peak anonymous resident memory (RssAnon of
/proc/self/status, sampled every 5 ms) of each, so the test sees what the big file adds."""

import json
import sys
import threading
import time


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


peak = [0]


def watch() -> None:
    while True:
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.005)


def run(cli, config: str, out: str) -> tuple[list[int], int]:
    peak[0] = rss_anon()
    train = cli(["train", "--config", config, "--hidden", "4", "--latent-dim", "2", "--batch-size", "512",
                 "--max-epochs", "1", "--no-evaluate", "-q", "--out", out])
    evaluate = cli(["evaluate", out, "--iw-samples", "2", "--json"])
    time.sleep(0.02)
    return [train, evaluate], max(peak[0], rss_anon())


def main() -> None:
    tiny_config, big_config, root = sys.argv[1:4]
    from elbokit.cli import main as cli

    threading.Thread(target=watch, daemon=True).start()
    tiny_codes, tiny_peak = run(cli, tiny_config, f"{root}/tiny-run")
    big_codes, big_peak = run(cli, big_config, f"{root}/big-run")
    print(json.dumps({"tiny_peak": tiny_peak, "big_peak": big_peak, "codes": tiny_codes + big_codes}))


if __name__ == "__main__":
    main()
