"""Build an HTML template that lets `dvc plots show/diff` render with no internet.

    python -m tools.offline_plots      (`make plots` runs it, then `dvc plots show`)

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so its plots are blank
offline. This fetches the three libraries from the npm registry once (`npm pack`), inlines
them into a template, and points this clone's DVC at it (`.dvc/config.local`, untracked),
so plain `dvc plots show` and `dvc plots diff` work offline from then on.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mnistlab.executables import child_env

# Majors match the vega-lite specs DVC writes; the minors are whatever npm serves.
PACKAGES = {"vega@5": "vega.min.js", "vega-lite@5": "vega-lite.min.js",
            "vega-embed@6": "vega-embed.min.js"}
TEMPLATE = Path(".dvc/plots/offline.html")  # DVC resolves a relative template from .dvc/


def fetch_scripts() -> list[str]:
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["npm", "pack", "--silent", *PACKAGES], cwd=tmp, check=True,
                             capture_output=True, text=True).stdout.split()
        for tarball, script in zip(out, PACKAGES.values()):
            with tarfile.open(Path(tmp) / tarball) as archive:
                member = archive.extractfile(f"package/build/{script}")
                scripts.append(member.read().decode())
    return scripts


def main() -> None:
    if not TEMPLATE.exists():
        try:
            scripts = fetch_scripts()
        except (OSError, subprocess.CalledProcessError) as err:
            sys.exit(f"offline_plots: could not fetch vega from the npm registry: {err}")
        inline = "\n".join(f"<script>{js}</script>" for js in scripts)
        TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
        TEMPLATE.write_text(
            "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n"
            f"<title>DVC plots</title>\n{inline}\n"
            "<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n"
            "</body>\n</html>\n")
    subprocess.run(["dvc", "config", "--local", "plots.html_template",
                    str(TEMPLATE.relative_to(".dvc"))], check=True, env=child_env())
    print(f"offline plots template: {TEMPLATE} (set as plots.html_template in .dvc/config.local)")


if __name__ == "__main__":
    main()
