#!/bin/sh
# Install Corral from a checkout into a fresh virtual environment: install.sh VENV SOURCE_DIR
# The image's Dockerfile runs exactly this; .ci/run runs it too, into a throwaway venv, so the image's
# install steps are proven on every CI run even where no image can be built.
set -eu
venv="$1"
src="$2"
python3 -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --quiet --disable-pip-version-check "$src"
# Byte-compiled at install time: the image's filesystem may be read-only at run time.
"$venv/bin/python" -m compileall -q "$venv/lib" >/dev/null
"$venv/bin/corral" --help >/dev/null
