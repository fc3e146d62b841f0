#!/usr/bin/env bash
# The demo page in CI. Installs the caption font (fonts-wqy-microhei: Latin, Greek, Cyrillic, CJK, Hangul; the
# suite's caption tests need it), headless Chromium with its driver (Debian packages) and the page's Python
# packages, then runs examples/test_app.py (the page builds, serves and segments, no browser) and
# examples/test_app_browser.py (the same in headless Chromium). If Chromium cannot be installed it says so and runs
# the first only. Uses the .venv that .ci/run makes; run it after that and before the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .venv/bin/activate ]; then
    echo "browser.sh: no .venv here; make it first (see .ci/run)" >&2
    exit 2
fi
. .venv/bin/activate

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || echo "browser.sh: apt-get update failed; trying the package lists there are"
    apt-get install -y -qq fonts-wqy-microhei >/dev/null || echo "browser.sh: could not install fonts-wqy-microhei"
    apt-get install -y -qq chromium chromium-driver >/dev/null || echo "browser.sh: could not install chromium"
else
    echo "browser.sh: not root or no apt-get: installing no Debian packages"
fi
# .ci/run builds other virtualenvs meanwhile: editable installs of this folder take turns (each writes its egg-info)
flock .ci-editable.lock pip install -q -e ".[app,dev]" "selenium>=4.40,<5"

tests=(examples/test_app.py)
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    tests+=(examples/test_app_browser.py)
else
    echo "browser.sh: Chromium is not installed here, so the page is tested without a browser only"
fi
GRADIO_ANALYTICS_ENABLED=False python -m pytest "${tests[@]}" -q -p no:cacheprovider
