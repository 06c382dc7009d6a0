#!/usr/bin/env bash
# Screenshot of a rendered Bastion report (headless Chromium), for the docs.
# Usage: scripts/screenshot_report.sh [REPORT_HTML] [OUT_PNG] [WIDTHxHEIGHT]
set -euo pipefail
report="${1:-runs/quick/report/report.html}"
out="${2:-docs/images/report.png}"
size="${3:-1280,2000}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then echo "screenshot_report.sh: chromium not found (apt-get install chromium)" >&2; exit 1; fi
if [ ! -f "$report" ]; then echo "screenshot_report.sh: no report at $report (run 'bastion run' first)" >&2; exit 1; fi
mkdir -p "$(dirname "$out")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
abs="$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
"$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run --hide-scrollbars \
  --user-data-dir="$profile" --virtual-time-budget=5000 --window-size="${size/x/,}" \
  --screenshot="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")" "file://$abs" 2>/dev/null
echo "wrote $out"
