"""Put a command's output (or a generated markdown file) into the README between markers.

    python scripts/update_readme.py NAME -- COMMAND [ARGS...]   # runs it, embeds its stdout
    python scripts/update_readme.py NAME --file generated.md      # embeds the file as it is

The README holds ``<!-- out:NAME -->`` ... ``<!-- /out:NAME -->``; everything between them is
replaced. Embedded command output is prefixed by the command line, the machine and the date, so
each figure in the README says where it comes from. The command's exit status is passed on and
the README is left alone when the command fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
sys.path.insert(0, str(README.parent))  # the repository's package, also where it is not installed (a GPU image)

from xrdmatch.platform.machine import cpu_model  # noqa: E402


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - torch is optional here
        gpu = "no GPU"
    return f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}"


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- out:{name} -->", f"<!-- /out:{name} -->"
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise SystemExit(f"README.md has no {start} ... {end} block")
    return pat.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text, count=1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--file", type=Path, help="embed this markdown file instead of running a command")
    args = ap.parse_args(argv)
    if bool(cmd) == bool(args.file):
        ap.error("give either -- COMMAND ... or --file FILE")
    if args.file:
        body = args.file.read_text()
    else:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:  # tee: the user sees progress while it runs
            sys.stdout.write(line)
            lines.append(line)
        rc = proc.wait()
        if rc != 0:
            print(f"update_readme: `{shlex.join(cmd)}` exited with {rc}; README.md not changed", file=sys.stderr)
            return rc
        when = time.strftime("%Y-%m-%d", time.gmtime())
        body = (f"`{shlex.join(cmd)}` ({machine()}; {when}; {time.time() - t0:.0f} s):\n\n"
                "```text\n" + "".join(lines).rstrip() + "\n```")
    README.write_text(replace_block(README.read_text(), args.name, body))
    print(f"update_readme: README.md block {args.name} updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
