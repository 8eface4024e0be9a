"""`make fuzz`: schemathesis against /openapi.json of the service on the default models.

    python loadtests/fuzz.py --max-examples 100 --max-time 600

Starts `rewardserve serve` (default reward model and policy, small Best-of-N limits so a
generated request stays cheap), runs `schemathesis run` with the checks the CI test uses
(tests/integration/test_fuzz.py: no 5xx, documented status, content type and body), and
stops the server. Its reports go under --out. Exits with schemathesis' exit code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import ROOT, default_server

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,"
CHECKS += "response_schema_conformance"
# Each generated Best-of-N request must stay cheap on a CPU: a few candidates of few prompts.
LIMITS = ("--max-n", "4", "--max-prompts-per-request", "2", "--max-candidates", "16",
          "--max-items-per-request", "16")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-examples", type=int, default=100, help="per operation and phase")
    p.add_argument("--max-time", type=int, default=900, help="seconds for the whole run")
    p.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "fuzz")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with default_server(args.backend, *LIMITS) as server:
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")), "run",
            server.url_for("openapi.json"),
            "--checks", CHECKS,
            "--max-examples", str(args.max_examples),
            "--max-time", str(args.max_time),
            "--request-timeout", "300",
            "--workers", "2",
            # a fuzzed unload of the served model would make every later answer a
            # deliberate 503; the admin routes' validation is fuzzed in the CI test
            "--exclude-path-regex", "^/v1/admin/",
            "--report", "junit", "--report-dir", str(args.out),
        ]  # fmt: skip
        rc = subprocess.run(cmd, cwd=args.out).returncode
        alive = server.proc is not None and server.proc.poll() is None
    if not alive:
        print("the server died during the fuzz run", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
