#!/bin/sh
# Install Debian's chromium for the report's browser test when it is missing and we can
# (root with apt-get). Never fails `make setup`: without chromium that one test is skipped.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }
fi
command -v chromium >/dev/null 2>&1 \
    || echo "note: chromium is not installed; the report's browser test will be skipped"
exit 0
